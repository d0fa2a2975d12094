"""Benchmark LaSS's grouping by mask: a mixed-direction training step against one shared forward.

    python scripts/bench_lass.py                  # embedded e5 warm-started bert2bert (trimmed, 4+2 layers)
    python scripts/bench_lass.py --backbone tiny --quick

One training step (forward + backward, no optimizer step) of the same tensors:

* ``shared``: the plain multilingual model, every targeted weight trainable, one forward;
* ``lass_one``: LaSS, every example of one direction (one masked forward, W ⊙ M built once);
* ``lass_mixed4``: LaSS, the batch mixing 4 directions (4 masked forwards of a quarter batch).

The masks are random (prune 0.3): their cost does not depend on which entries they keep.
The optimizer step's restore (a copy and a ``where`` per targeted weight) is not timed.
Variants run interleaved in one process (``_bench.interleave``); nothing asserts on time.
Writes ``lass-<backbone>.json/.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import (  # noqa: E402  (first: it sets OMP_WAIT_POLICY before torch loads)
    BENCH_CACHE, DEFAULT_OUT, TIMING_HEADERS, Budget, environment, fill_defaults, interleave, md_table, ratio,
    setup_torch, timing_row, write_report,
)
from bench_nmt import DIRECTIONS, backbone_folder, make_batch  # noqa: E402
import torch  # noqa: E402


def modules(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    from xlpeft.lightning.lass import LassTranslation
    from xlpeft.methods.lass import keep_indices

    torch.manual_seed(0)
    lass = LassTranslation(backbone=str(folder), directions=["-".join(d) for d in DIRECTIONS], prune=0.3,
                           encoder_layers=args.encoder_layers, decoder_layers=args.decoder_layers).train()
    gen = torch.Generator().manual_seed(0)
    lass.masks.set({d: {n: keep_indices(torch.rand(w.shape, generator=gen), lass.masks.indices(d, n).numel())
                        for n, w in lass.targets.items()} for d in lass.lass.directions})
    torch.manual_seed(0)
    shared = LassTranslation(backbone=str(folder), directions=["-".join(d) for d in DIRECTIONS], prune=0.3,
                             encoder_layers=args.encoder_layers, decoder_layers=args.decoder_layers).train()
    return {"lass": lass, "shared": shared}  # `shared` has no masks: its forward is the plain model's


def bench_train(folder: Path, args: argparse.Namespace, budget: float) -> dict[str, Any]:
    ms = modules(folder, args)
    mixed, one = make_batch(ms["lass"], args.batch, args.seq, True), make_batch(ms["lass"], args.batch, args.seq, False)

    def step(m: Any, batch: dict) -> Any:
        def run() -> None:
            m.training_step(batch, 0).backward()
            m.zero_grad(set_to_none=True)
        return run
    variants = {"shared": step(ms["shared"], mixed), "lass_one": step(ms["lass"], one),
                "lass_mixed4": step(ms["lass"], mixed)}
    timing = interleave(variants, args.reps, args.warmup, budget)
    return {"timing": timing, "mixed4_vs_shared": ratio(timing, "lass_mixed4", "shared"),
            "one_vs_shared": ratio(timing, "lass_one", "shared"),
            "mixed4_vs_one": ratio(timing, "lass_mixed4", "lass_one"),
            "targeted_weights": len(ms["lass"].targets),
            "targeted_entries": sum(w.numel() for w in ms["lass"].targets.values())}


def tables(result: dict[str, Any]) -> str:
    t = result["timing"]
    rows = [timing_row("train step: LaSS 4 directions mixed / shared model", t, "lass_mixed4", "shared", "report"),
            timing_row("train step: LaSS 1 direction / shared model", t, "lass_one", "shared", "report"),
            timing_row("train step: LaSS 4 directions mixed / LaSS 1 direction", t, "lass_mixed4", "lass_one", "report")]
    return md_table(TIMING_HEADERS, rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=("embedded", "tiny"), default="embedded")
    p.add_argument("--batch", type=int, help="default 8; quick 4")
    p.add_argument("--seq", type=int, help="default 32; quick 12")
    p.add_argument("--reps", type=int, help="most timed rounds (default 10; quick 3)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 1)")
    p.add_argument("--budget", type=float, help="seconds for all timed rounds (default 120; quick 20)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lines", type=int, default=1000, help="pairs per corpus for vocabulary trimming")
    p.add_argument("--encoder-layers", type=int, default=4)
    p.add_argument("--decoder-layers", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if args.backbone == "tiny":
        args.encoder_layers, args.decoder_layers = None, None
    return fill_defaults(args, {"batch": 8, "seq": 32, "reps": 10, "warmup": 1, "budget": 120.0},
                         {"batch": 4, "seq": 12, "reps": 3, "budget": 20.0})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    setup_torch(args.threads)
    folder = backbone_folder(args)
    result = bench_train(folder, args, Budget(args.budget).share(1))
    payload = {"benchmark": "lass", "backbone": args.backbone, "folder": str(folder), "cache": str(BENCH_CACHE),
               "batch": args.batch, "seq": args.seq, "directions": ["-".join(d) for d in DIRECTIONS],
               "env": environment(args.threads), "args": vars(args), "results": result}
    write_report(args.out, f"lass-{args.backbone}", payload, tables(result))
    return payload


if __name__ == "__main__":
    main()
