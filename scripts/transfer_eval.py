"""Zero-shot transfer harness: a language × setup table with paired bootstrap 95 % CIs.

    python scripts/transfer_eval.py --out runs/transfer                 # one recipe
    python scripts/transfer_eval.py --ablation --out runs/ablation      # the ablation rows

Setups per target language: ``none`` (task adapter alone), ``source`` (the
English language adapter), ``own`` (the target's). Writes ``transfer.json``,
``transfer.md`` and ``transfer.png`` (error bars) to ``--out``; the work is in
:mod:`xlpeft.lightning.transfer`. ``main(argv)`` is the entry point.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from xlpeft.lightning.transfer import EvalConfig, Recipe, run

CANONICAL = {"method": "union", "configs": [
    {"method": "bottleneck", "reduction_factor": 2, "placement": ["ffn"], "original_ln_before": True},
    {"method": "invertible", "reduction_factor": 2}]}
CANONICAL_TASK = {"method": "bottleneck", "reduction_factor": 16, "placement": ["ffn"], "original_ln_before": True}
NO_INVERTIBLE = {"method": "bottleneck", "reduction_factor": 2, "placement": ["ffn"]}


def ablation_recipes(adapter_steps: int, task_steps: int) -> list[Recipe]:
    """The rows of the ablation table (each differs from ``default`` in one thing)."""
    base = Recipe("default (madx-language)", adapter="madx-language", task_adapter="pfeiffer",
                  adapter_steps=adapter_steps, task_steps=task_steps)
    return [
        base,
        dataclasses.replace(base, name="canonical placement (SeqBn)", adapter=CANONICAL,
                            task_adapter=CANONICAL_TASK),
        dataclasses.replace(base, name="leave_out last layer at task time", leave_out=(-1,)),
        dataclasses.replace(base, name="no invertible adapter", adapter=NO_INVERTIBLE),
        dataclasses.replace(base, name=f"adapter steps ×2 ({2 * adapter_steps})", adapter_steps=2 * adapter_steps),
        dataclasses.replace(base, name="language-adapter dropout 0.3 (task training)", language_dropout=0.3),
    ]


def merge(folders: list[str], out: str) -> dict:
    """One table from runs made separately (e.g. ablation rows run side by side); same data required."""
    from pathlib import Path

    from xlpeft.lightning.transfer import markdown, plot
    parts = [json.loads((Path(f) / "transfer.json").read_text()) for f in folders]
    data_keys = ("source", "targets", "passage", "max_length", "per_genre", "eval_per_genre", "seeds")
    first = {k: parts[0]["config"][k] for k in data_keys}
    for folder, part in zip(folders, parts):
        if {k: part["config"][k] for k in data_keys} != first:
            raise SystemExit(f"{folder}: its data/seeds differ from {folders[0]}; rows would not be paired")
    results = {**parts[0], "recipes": [r for p in parts for r in p["recipes"]]}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "transfer.json").write_text(json.dumps(results, indent=1))
    (Path(out) / "transfer.md").write_text(markdown(results))
    plot(results, Path(out) / "transfer.png")
    print(markdown(results))
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="transfer_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    d = EvalConfig()
    parser.add_argument("--out", default=d.out)
    parser.add_argument("--backbone", default=None, help="prepared backbone folder (default: the demo's)")
    parser.add_argument("--targets", nargs="+", default=list(d.targets))
    parser.add_argument("--passage", type=int, default=d.passage)
    parser.add_argument("--max-length", type=int, default=d.max_length)
    parser.add_argument("--per-genre", type=int, default=d.per_genre)
    parser.add_argument("--eval-per-genre", type=int, default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds))
    parser.add_argument("--adapter", default="madx-language", help="preset name or JSON config")
    parser.add_argument("--task-adapter", default="pfeiffer",
                        help="task-adapter preset or JSON config (keep the language adapter's placement)")
    parser.add_argument("--adapter-steps", type=int, default=300)
    parser.add_argument("--task-steps", type=int, default=200)
    parser.add_argument("--leave-out", nargs="*", type=int, default=[])
    parser.add_argument("--ablation", action="store_true", help="run the ablation rows instead of one recipe")
    parser.add_argument("--only", nargs="*", default=None, help="with --ablation: row indices to run")
    parser.add_argument("--bootstrap", type=int, default=d.bootstrap)
    parser.add_argument("--lr-task", type=float, default=d.lr_task)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--merge", nargs="+", default=None,
                        help="combine the transfer.json of these output folders into one table in --out")
    a = parser.parse_args(argv)
    if a.merge:
        return merge(a.merge, a.out)
    adapter, task_adapter = (json.loads(x) if x.lstrip().startswith("{") else x for x in (a.adapter, a.task_adapter))
    if a.ablation:
        recipes = ablation_recipes(a.adapter_steps, a.task_steps)
        if a.only:
            recipes = [recipes[int(i)] for i in a.only]
    else:
        label = " + ".join(x if isinstance(x, str) else x.get("method", "custom") for x in (adapter, task_adapter))
        recipes = [Recipe(label, adapter=adapter, task_adapter=task_adapter,
                          adapter_steps=a.adapter_steps,
                          leave_out=tuple(a.leave_out), task_steps=a.task_steps)]
    cfg = EvalConfig(out=a.out, backbone=a.backbone, targets=tuple(a.targets), passage=a.passage,
                     max_length=a.max_length, per_genre=a.per_genre, eval_per_genre=a.eval_per_genre,
                     seeds=tuple(a.seeds), bootstrap=a.bootstrap, lr_task=a.lr_task,
                     batch_size=a.batch_size, recipes=recipes)
    return run(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
