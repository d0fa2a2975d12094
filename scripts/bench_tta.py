"""Test-time adaptation cost: EMEA (k = 1, 10 entropy steps) vs plain inference, side by side.

    plain    Stack("eng", "task") forward, no grad                     (baseline)
    uniform  Stack(Average(eng, swh, tgl), "task"), no steps            (ensemble cost alone)
    emea1    1 entropy step on the per-layer weights, then predict
    emea10   10 entropy steps, then predict
    emea10-ckpt  the same with activation checkpointing during the steps (``checkpointing=True``)

One test batch (``--batch`` verses × ``--seq`` tokens) of a classification
head over mean-pooled states. Time: interleaved rounds in one process, the
headline is the median of per-round paired ratios (see ``_bench.py``). Peak
memory: a fresh subprocess per variant (run one after another) loads the
model and the batch, resets VmHWM, runs the variant once and reports
peak − resident before it: the extra memory the variant needs.

    python scripts/bench_tta.py [--backbone embedded|tiny] [--quick] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from typing import Any

from _bench import (  # noqa: I001  (sets up sys.path for xlpeft)
    DEFAULT_OUT, LANGS, TIMING_HEADERS, bible_lines, embedded_source, environment, fill_defaults, fmt,
    interleave, md_table, ratio, reset_peak_rss, rss_mb, setup_torch, timing_row, tiny_unigram_backbone,
    trimmed_backbone, write_report,
)
import _bench
import torch

from xlpeft import Stack
from xlpeft.lightning.task import TaskAdaptation
from xlpeft.lightning.tta import TestTimeAdaptation

CANDIDATES = ("eng", "swh", "tgl")


def build(backbone: str, seed: int = 0) -> TaskAdaptation:
    """A genre-like classifier: 3 random (non-identity) language adapters + a task adapter."""
    module = TaskAdaptation(backbone=backbone, labels=[str(i) for i in range(7)], task_adapter="task")
    for lang in CANDIDATES:
        module.adapted.add_adapter(lang, "pfeiffer")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(("adapted.points.", "head.")):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    module.eval_setups = {}
    return module.eval()


def make_batch(module: TaskAdaptation, texts: list[str], batch: int, seq: int) -> dict[str, Any]:
    tok = module.adapted.tokenizer
    enc = tok(texts[:batch], truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "langs": ["ind"] * batch}


def variants(module: TaskAdaptation, batch: dict[str, Any]) -> dict[str, Any]:
    callbacks = {name: TestTimeAdaptation(method=m, steps=k, lr=0.1, candidates=list(CANDIDATES),
                                          track_entropy=False, checkpointing=ckpt)
                 for name, m, k, ckpt in (("uniform", "uniform", 0, False), ("emea1", "emea", 1, False),
                                          ("emea10", "emea", 10, False), ("emea10-ckpt", "emea", 10, True))}
    for cb in callbacks.values():
        cb.setup(None, module, "test")

    def plain() -> torch.Tensor:
        module.eval_setups = {"ind": Stack("eng", "task")}
        with torch.inference_mode():
            return module(batch).argmax(-1)

    def tta(name: str):
        def run() -> torch.Tensor:
            with torch.inference_mode():
                callbacks[name].adapt(module, batch)
                out = module(batch).argmax(-1)
            callbacks[name].restore(module)
            return out
        return run
    return {"plain": plain, **{name: tta(name) for name in callbacks}}


def memory_child(fns: dict[str, Any], name: str) -> None:
    """In a fresh process: the extra peak RSS of one run of variant ``name`` (printed as JSON)."""
    gc.collect()
    before = rss_mb()["rss_mb"]
    ok = reset_peak_rss()
    fns[name]()
    print("MEMORY " + json.dumps({"extra_peak_mb": rss_mb()["peak_mb"] - before if ok else float("nan"),
                                  "rss_before_mb": before}))


def peak_memory(argv: list[str], names: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for name in names:  # one after another: children do not compete for the two cores
        env = {**os.environ, "XLPEFT_BENCH_CACHE": str(_bench.BENCH_CACHE)}  # the parent's cache
        proc = subprocess.run([sys.executable, __file__, *argv, "--child-memory", name],
                              capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"memory subprocess for {name!r} failed:\n{proc.stderr[-2000:]}")
        out[name] = json.loads(line[len("MEMORY "):])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="embedded", choices=["embedded", "tiny"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = fill_defaults(p.parse_args(argv), {"batch": 32, "seq": 64, "reps": 5, "budget_s": 240},
                         {"batch": 8, "seq": 32, "reps": 2, "budget_s": 30})
    setup_torch(args.threads)
    texts = bible_lines(LANGS, 2000)
    path = (str(trimmed_backbone(embedded_source, texts, "e5-small-eng-swh-2000")) if args.backbone == "embedded"
            else str(tiny_unigram_backbone(texts)))
    module = build(path)
    batch = make_batch(module, texts["swh"], args.batch, args.seq)
    fns = variants(module, batch)
    if args.child_memory:
        memory_child(fns, args.child_memory)
        return
    timing = interleave(fns, reps=args.reps, warmup=1, budget_s=args.budget_s)
    memory = {} if args.no_memory else peak_memory(raw, list(fns))
    rows = [timing_row(f"{name} vs plain", timing, name, "plain", "–")
            for name in ("uniform", "emea1", "emea10", "emea10-ckpt")]
    base = memory.get("plain", {}).get("extra_peak_mb", 0.0)
    mem_rows = [[name, fmt(m["extra_peak_mb"], 1), fmt(m["extra_peak_mb"] / base, 2) if base >= 1 else "–"]
                for name, m in memory.items()]
    table = (md_table(TIMING_HEADERS, rows) + "\n\nExtra peak memory over the loaded model and batch (fresh "
             "process per variant, VmHWM reset before its run):\n\n"
             + md_table(["variant", "extra peak MiB", "× plain"], mem_rows))
    payload = {"args": vars(args), "environment": environment(args.threads), "timing": timing,
               "ratios": {n: ratio(timing, n, "plain") for n in ("uniform", "emea1", "emea10", "emea10-ckpt")},
               "memory": memory}
    write_report(args.out, "bench_tta", payload, table)


if __name__ == "__main__":
    main()
