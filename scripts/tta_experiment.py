"""Zero-shot genre classification with test-time adaptation, per target language.

A genre task adapter (+ head) trains on English under Stack("eng", "genre"),
then every target language is tested five ways:

    source     Stack("eng", "genre")                         (English adapter only)
    uniform    Stack(Average(top-k candidates), "genre")     (no steps)
    emea-1     the same, per-layer weights after 1 entropy step per test batch
    emea-10    … after 10 steps
    tent-10    Stack("eng", "genre"), LayerNorm parameters after 10 entropy steps per batch (reset)

Candidates are the language adapters in ``--adapters`` minus the target's own
(typologically nearest ``--top-k`` first). Writes ``results.json`` and ``results.md``.

    XLPEFT_CACHE=/tmp/xlc python scripts/tta_experiment.py --backbone <path> --adapters <dir>
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

METHODS = {"source": None, "uniform": ("uniform", 0), "emea-1": ("emea", 1), "emea-10": ("emea", 10),
           "tent-10": ("tent", 10)}


def trainer(steps: int = 1, callbacks: list | None = None):
    import lightning as L
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=callbacks or [])


def train_language_adapters(args: argparse.Namespace) -> dict:
    """MAD-X language adapters for ``args.languages`` by routed MLM (one run), exported to ``args.adapters``."""
    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning.mlm import MaskedLMAdaptation
    start = time.perf_counter()
    module = MaskedLMAdaptation(args.backbone, languages=args.languages, lr=1e-3, warmup_steps=10)
    data = MLMDataModule(args.languages, backbone=args.backbone, batch_size=16, max_length=args.max_length,
                         max_train_lines=2000, temperature=1e9)
    trainer(args.adapter_steps).fit(module, data)
    module.export_adapters(args.adapters)
    return {"source": args.adapters, "trained_here": True, "steps": args.adapter_steps,
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", required=True)
    p.add_argument("--adapters", required=True, help="folder with one language adapter per sub-folder")
    p.add_argument("--languages", nargs="+", default=["eng", "swh", "tgl", "nah"])
    p.add_argument("--targets", nargs="+", default=["spa", "deu", "swh", "tgl"])
    p.add_argument("--task-steps", type=int, default=80)
    p.add_argument("--task-lr", type=float, default=2e-3)
    p.add_argument("--per-genre", type=int, default=200)
    p.add_argument("--eval-per-genre", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=35)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--emea-lr", type=float, default=0.1)
    p.add_argument("--tent-lr", type=float, default=5e-4)
    p.add_argument("--adapter-steps", type=int, default=60,
                   help="routed MLM steps to train the language adapters when --adapters lacks them")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="/tmp/cb/tta")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import lightning as L

    from xlpeft.data.datamodules import GenreDataModule
    from xlpeft.data.genre import GENRES
    from xlpeft.lightning.task import TaskAdaptation
    from xlpeft.lightning.tta import TestTimeAdaptation

    L.seed_everything(0, verbose=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapters = {lang: str(Path(args.adapters) / lang) for lang in args.languages}
    if not all(Path(a, "adapter_config.json").is_file() for a in adapters.values()):
        results_adapters = train_language_adapters(args)
    else:
        results_adapters = {"source": args.adapters, "trained_here": False}
    module = TaskAdaptation(args.backbone, labels=GENRES, task_adapter="genre", language_adapters=adapters,
                            eval_mode="source", lr=args.task_lr, warmup_steps=10)
    train = GenreDataModule("eng", ["eng"], backbone=args.backbone, batch_size=args.batch_size,
                            max_length=args.max_length, max_per_genre=args.per_genre,
                            max_eval_per_genre=args.eval_per_genre)
    start = time.perf_counter()
    trainer(args.task_steps).fit(module, train)
    results: dict = {"args": vars(args), "train_s": round(time.perf_counter() - start, 1),
                     "language_adapters": results_adapters, "rows": {}}
    for target in args.targets:
        data = GenreDataModule("eng", [target], backbone=args.backbone, batch_size=args.eval_batch_size,
                               max_length=args.max_length, max_eval_per_genre=args.eval_per_genre)
        row = results["rows"].setdefault(target, {})
        for name, spec in METHODS.items():
            callbacks = []
            if spec is not None:
                method, steps = spec
                callbacks = [TestTimeAdaptation(method=method, steps=steps, top_k=args.top_k,
                                                lr=args.tent_lr if method == "tent" else args.emea_lr,
                                                candidates=args.languages, tent_params=("layernorm",))]
            t0 = time.perf_counter()
            trainer(1, callbacks).test(module, data, verbose=False)
            row[name] = {**module.results[target], "seconds": round(time.perf_counter() - t0, 1)}
            if callbacks:
                cb = callbacks[0]
                row[name]["candidates"] = cb.candidates_for(target) if spec[0] != "tent" else ["eng"]
                log = [e for e in cb.entropy_log if e[1] != e[2]] or cb.entropy_log
                if log:
                    row[name]["entropy_before"] = sum(e[1] for e in log) / len(log)
                    row[name]["entropy_after"] = sum(e[2] for e in log) / len(log)
            print(target, name, json.dumps(row[name]), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    names = list(METHODS)
    lines = ["| target | candidates | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for target, row in results["rows"].items():
        cands = ", ".join(row.get("uniform", {}).get("candidates", []))
        cells = [f"{row[n]['accuracy'] * 100:.1f} / {row[n]['macro_f1'] * 100:.1f}" if n in row else "–"
                 for n in names]
        lines.append(f"| {target} | {cands} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(accuracy / macro-F1, %)\n"


if __name__ == "__main__":
    main()
