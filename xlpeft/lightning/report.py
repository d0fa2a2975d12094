"""Demo and transfer results as Markdown tables, JSON and PNG plots (error bars, chance line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SETUPS = ("none", "source", "own", "typology")
"""Columns of the transfer table: the task adapter alone; under the source's language adapter;
under the target's own; under a typology-weighted ``Average`` of the *other* trained language
adapters (lang2vec similarity, the target's own excluded). See ``xlpeft.lightning.transfer``."""


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


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def transfer_markdown(results: dict) -> str:
    """One table per recipe (language × setup) and one ablation table of Δ(own − source)."""
    from xlpeft.data.genre import GENRES
    cfg = results["config"]
    lines = [f"Genre of {cfg['passage']}-verse passages, {len(GENRES)} classes (chance ≈ "
             f"{100 / len(GENRES):.1f} %, majority class in test ≈ {_pct(results['majority_share'])} %); "
             f"accuracy % [95 % CI], paired bootstrap over examples (task seeds: {len(cfg['seeds'])}).", ""]
    for r in results["recipes"]:
        lines += [f"### {r['recipe']['name']}", "",
                  "| language | role | n | none | English adapter | own adapter | typology average | "
                  "Δ own − English | Δ English − none |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for lang, row in r["languages"].items():
            cells = [f"{_pct(row[s]['acc'])} [{_pct(row[s]['lo'])}, {_pct(row[s]['hi'])}]" for s in SETUPS]
            d1, d2 = row["own_minus_source"], row["source_minus_none"]
            src = row["role"].startswith("source")
            own_cell = "= English" if src else cells[2]
            delta = "—" if src else f"{_pct(d1['delta'])} [{_pct(d1['lo'])}, {_pct(d1['hi'])}]"
            lines.append(f"| {lang} | {row['role']} | {row['examples']} | {cells[0]} | {cells[1]} | {own_cell} | "
                         f"{'—' if src else cells[3]} | {delta} | {_pct(d2['delta'])} [{_pct(d2['lo'])}, {_pct(d2['hi'])}] |")
        lines.append("")
    targets = [l for l in results["recipes"][0]["languages"] if l != cfg["source"]]
    lines += ["### Ablation: Δ(own − English) in points [95 % CI]", "",
              "| recipe | source acc | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
    for r in results["recipes"]:
        src = r["languages"][cfg["source"]]["source"]
        cells = [f"{_pct(r['languages'][t]['own_minus_source']['delta'])} "
                 f"[{_pct(r['languages'][t]['own_minus_source']['lo'])}, {_pct(r['languages'][t]['own_minus_source']['hi'])}]"
                 for t in targets]
        lines.append(f"| {r['recipe']['name']} | {_pct(src['acc'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def transfer_plot(results: dict, path: Path) -> None:
    """Accuracy per language × setup with 95 % CI error bars, chance line, sample counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from xlpeft.data.genre import GENRES

    recipes = results["recipes"]
    fig, axes = plt.subplots(1, len(recipes), figsize=(4.5 * len(recipes), 4), squeeze=False, sharey=True)
    labels = {"none": "task only", "source": "English adapter", "own": "own adapter",
              "typology": "typology average"}
    width = 0.8 / len(SETUPS)
    for ax, r in zip(axes[0], recipes):
        langs = list(r["languages"])
        for j, s in enumerate(SETUPS):
            xs = np.arange(len(langs)) + (j - (len(SETUPS) - 1) / 2) * width
            acc = [100 * r["languages"][l][s]["acc"] for l in langs]
            err = [[100 * (r["languages"][l][s]["acc"] - r["languages"][l][s]["lo"]) for l in langs],
                   [100 * (r["languages"][l][s]["hi"] - r["languages"][l][s]["acc"]) for l in langs]]
            bars = ax.bar(xs, acc, width, yerr=err, capsize=3, label=labels[s])
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        ax.axhline(100 / len(GENRES), color="grey", ls="--", lw=1, label="chance")
        ax.set_xticks(np.arange(len(langs)),
                      [f"{l}\n({'source' if l == results['config']['source'] else 'zero-shot'}, "
                       f"n={r['languages'][l]['examples']})" for l in langs], fontsize=8)
        ax.set_title(r["recipe"]["name"], fontsize=9)
    axes[0][0].set_ylabel("accuracy % (95 % CI)")
    for ax in axes[0]:
        ax.set_ylim(0, 100)
    axes[0][-1].legend(fontsize=7, loc="upper right", ncol=2)
    fig.suptitle(f"Genre of {results['config']['passage']}-verse passages: zero-shot transfer "
                 f"(task seeds: {len(results['config']['seeds'])})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
