"""Demo and transfer results as Markdown tables, JSON and PNG plots (error bars, chance line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LABELS = {"none": "none", "source": "English adapter", "own": "own adapter", "typology": "typology average",
          "uniform": "uniform ensemble", "emea": "EMEA"}
"""Column names of the transfer setups (see :data:`xlpeft.lightning.transfer_stages.SETUPS`)."""
DELTA_COLUMNS = (("own", "source"), ("source", "none"), ("emea", "uniform"))
"""The paired Δ columns of the per-recipe tables (all Δ are in transfer.json)."""


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


def _setups(recipe: dict) -> list[str]:
    """Setups evaluated in a recipe, in :data:`LABELS` order (the source row holds a subset)."""
    have = {s for row in recipe["languages"].values() for s in LABELS if s in row}
    return [s for s in LABELS if s in have]


def _ci(cell: dict | None) -> str:
    if cell is None:
        return "—"
    value = cell["delta"] if "delta" in cell else cell["acc"]
    return f"{_pct(value)} [{_pct(cell['lo'])}, {_pct(cell['hi'])}]"


def _delta_name(a: str, b: str) -> str:
    return f"Δ {LABELS[a].replace(' adapter', '')} − {LABELS[b].replace(' adapter', '')}"


def transfer_markdown(results: dict) -> str:
    """One table per recipe (language × setup, paired Δ) and one ablation table of Δ(own − source)."""
    from xlpeft.data.genre import GENRES
    cfg = results["config"]
    lines = [f"Genre of {cfg['passage']}-verse passages, {len(GENRES)} classes (chance ≈ "
             f"{100 / len(GENRES):.1f} %, majority class in test ≈ {_pct(results['majority_share'])} %); "
             f"accuracy % [95 % CI], paired bootstrap over examples (task seeds: {len(cfg['seeds'])}).", ""]
    for r in results["recipes"]:
        setups = _setups(r)
        deltas = [(a, b) for a, b in DELTA_COLUMNS if a in setups and b in setups]
        lines += [f"### {r['recipe']['name']}", "",
                  "| language | role | n | " + " | ".join(LABELS[s] for s in setups) + " | "
                  + " | ".join(_delta_name(a, b) for a, b in deltas) + " |",
                  "|---|---|---|" + "---|" * (len(setups) + len(deltas))]
        for lang, row in r["languages"].items():
            src = row["role"].startswith("source")
            cells = ["= English" if src and s == "own" else _ci(row.get(s)) for s in setups]
            ds = ["—" if src and a != "source" else _ci(row.get(f"{a}_minus_{b}")) for a, b in deltas]
            lines.append(f"| {lang} | {row['role']} | {row['examples']} | " + " | ".join(cells + ds) + " |")
        lines.append("")
    targets = [l for l in results["recipes"][0]["languages"] if l != cfg["source"]]
    lines += ["### Ablation: Δ(own − English) in points [95 % CI]", "",
              "| recipe | source acc | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
    for r in results["recipes"]:
        src = r["languages"][cfg["source"]]["source"]
        cells = [_ci(r["languages"][t].get("own_minus_source")) for t in targets]
        lines.append(f"| {r['recipe']['name']} | {_pct(src['acc'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def transfer_plot(results: dict, path: Path) -> None:
    """Accuracy per language × setup with 95 % CI error bars, chance line, sample counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from xlpeft.data.genre import GENRES

    recipes = results["recipes"]
    fig, axes = plt.subplots(1, len(recipes), figsize=(5 * len(recipes), 4), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], recipes):
        langs, setups = list(r["languages"]), _setups(r)
        width = 0.8 / len(setups)
        for j, s in enumerate(setups):
            xs = np.arange(len(langs)) + (j - (len(setups) - 1) / 2) * width
            cells = [r["languages"][l].get(s) or {"acc": np.nan, "lo": np.nan, "hi": np.nan} for l in langs]
            acc = [100 * c["acc"] for c in cells]
            err = [[100 * (c["acc"] - c["lo"]) for c in cells], [100 * (c["hi"] - c["acc"]) for c in cells]]
            bars = ax.bar(xs, acc, width, yerr=err, capsize=2, label=LABELS[s])
            ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=2)
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
