"""Demo results as Markdown tables, JSON and a PNG plot next to them."""

from __future__ import annotations

import json
from pathlib import Path

from xlpeft.lightning.transfer import markdown as transfer_markdown


def mlm_markdown(mlm: dict) -> str:
    rows = ["| language | MLM loss without | with adapter | accuracy without | with adapter | masked tokens |",
            "|---|---:|---:|---:|---:|---:|"]
    for lang, r in sorted(mlm.items()):
        w, a = r.get("without", {}), r.get("with", {})
        rows.append(f"| {lang} | {w.get('loss', float('nan')):.3f} | {a.get('loss', float('nan')):.3f} "
                    f"| {100 * w.get('acc', float('nan')):.1f}% | {100 * a.get('acc', float('nan')):.1f}% "
                    f"| {a.get('tokens', 0)} |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    """Held-out MLM accuracy per language without / with its adapter (value labels, token counts)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    mlm = results["mlm"]
    langs = sorted(mlm)
    xs = range(len(langs))
    for off, key, label in ((-0.2, "without", "no adapter"), (0.2, "with", "own language adapter")):
        bars = ax.bar([x + off for x in xs], [mlm[l][key]["acc"] * 100 for l in langs], 0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(list(xs), [f"{l}\n(n={mlm[l]['with'].get('tokens', 0)} tokens)" for l in langs], fontsize=8)
    ax.set_ylabel("held-out MLM accuracy (%)")
    ax.set_title("Language adapters: held-out masked-LM accuracy", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out: Path) -> str:
    text = ("## Held-out masked LM per language\n\n" + mlm_markdown(results["mlm"]) +
            "\n\n## Genre transfer (task adapter trained on English; English row is in-language)\n\n" +
            transfer_markdown(results["genre"]) + "\nTimings (s): " +
            ", ".join(f"{k} {v:.0f}" for k, v in results["config"]["timings"].items()) + "\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, out / "results.png")
    print(text)
    print(f"[xlpeft demo] wrote {out / 'results.md'}, results.json, results.png and transfer/transfer.png")
    return text
