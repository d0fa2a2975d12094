"""Demo results as Markdown tables, JSON and a PNG plot next to them."""

from __future__ import annotations

import json
from pathlib import Path


def mlm_markdown(mlm: dict) -> str:
    rows = ["| language | MLM loss without | with adapter | accuracy without | with adapter | masked tokens |",
            "|---|---:|---:|---:|---:|---:|"]
    for lang, r in sorted(mlm.items()):
        w, a = r.get("without", {}), r.get("with", {})
        rows.append(f"| {lang} | {w.get('loss', float('nan')):.3f} | {a.get('loss', float('nan')):.3f} "
                    f"| {100 * w.get('acc', float('nan')):.1f}% | {100 * a.get('acc', float('nan')):.1f}% "
                    f"| {a.get('tokens', 0)} |")
    return "\n".join(rows)


def genre_markdown(genre: dict) -> str:
    rows = ["| language | accuracy, English adapter | with own adapter | macro-F1, English adapter | with own adapter | verses |",
            "|---|---:|---:|---:|---:|---:|"]
    for lang, r in sorted(genre.items()):
        s, o = r.get("source", {}), r.get("own", {})
        rows.append(f"| {lang} | {100 * s.get('accuracy', float('nan')):.1f}% | {100 * o.get('accuracy', float('nan')):.1f}% "
                    f"| {100 * s.get('macro_f1', float('nan')):.1f} | {100 * o.get('macro_f1', float('nan')):.1f} "
                    f"| {o.get('examples', 0)} |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    mlm = results["mlm"]
    langs = sorted(mlm)
    xs = range(len(langs))
    ax1.bar([x - 0.2 for x in xs], [mlm[l]["without"]["acc"] * 100 for l in langs], 0.4, label="no adapter")
    ax1.bar([x + 0.2 for x in xs], [mlm[l]["with"]["acc"] * 100 for l in langs], 0.4, label="language adapter")
    ax1.set_xticks(list(xs), langs)
    ax1.set_ylabel("held-out MLM accuracy (%)")
    ax1.legend()
    genre = results["genre"]
    glangs = sorted(genre)
    gx = range(len(glangs))
    ax2.bar([x - 0.2 for x in gx], [genre[l]["source"]["macro_f1"] * 100 for l in glangs], 0.4,
            label="Stack(eng, genre)")
    ax2.bar([x + 0.2 for x in gx], [genre[l]["own"]["macro_f1"] * 100 for l in glangs], 0.4,
            label="Stack(target, genre)")
    ax2.set_xticks(list(gx), glangs)
    ax2.set_ylabel("zero-shot genre macro-F1")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out: Path) -> str:
    text = ("## Held-out masked LM per language\n\n" + mlm_markdown(results["mlm"]) +
            "\n\n## Zero-shot genre classification (task adapter trained on English)\n\n" +
            genre_markdown(results["genre"]) + "\n\nTimings (s): " +
            ", ".join(f"{k} {v:.0f}" for k, v in results["config"]["timings"].items()) + "\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, out / "results.png")
    print(text)
    print(f"[xlpeft demo] wrote {out / 'results.md'}, results.json and results.png")
    return text
