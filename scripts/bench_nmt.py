"""Benchmark multilingual NMT with language adapters: routed training and generation cost.

    python scripts/bench_nmt.py                  # embedded e5 warm-started bert2bert (trimmed, 4+2 layers)
    python scripts/bench_nmt.py --backbone tiny --quick

1. one training step (forward + backward) on a batch mixing 4 directions (spa-nah, nah-spa,
   spa-ote, ote-spa: 3 encoder and 3 decoder groups of monolingual adapters) vs the same
   tensors routed as one direction (target: ratio ≤ 1.3);
2. greedy generation (fixed new-token count) with unmerged language adapters routed per
   example vs the bare model: tokens/s of each and their ratio.

Variants run interleaved in one process (``_bench.interleave``); the headline is the
median of per-round ratios. Nothing asserts on time. Writes ``nmt-<backbone>.json/.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import (  # noqa: E402  (first: it sets OMP_WAIT_POLICY before torch loads)
    BENCH_CACHE, DEFAULT_OUT, TIMING_HEADERS, Budget, environment, fill_defaults, fmt, interleave, md_table,
    ratio, setup_torch, summary, timing_row, tiny_unigram_backbone, trimmed_backbone, write_report,
)
import torch  # noqa: E402

DIRECTIONS = [("spa", "nah"), ("nah", "spa"), ("spa", "ote"), ("ote", "spa")]
TARGET_TRAIN = "≤ 1.3"


def texts(lines: int) -> dict[str, list[str]]:
    from xlpeft.data.parallel import corpus_pairs
    out: dict[str, list[str]] = {}
    for src, tgt in DIRECTIONS[::2]:
        for p in corpus_pairs(src, tgt, "train")[:lines]:
            out.setdefault(src, []).append(p.src)
            out.setdefault(tgt, []).append(p.tgt)
    return out


def backbone_folder(args: argparse.Namespace) -> Path:
    if args.backbone == "tiny":
        return tiny_unigram_backbone(texts(200), hidden=32, vocab=400)
    from xlpeft.backbones.embedded import embedded_backbone_path
    return trimmed_backbone(embedded_backbone_path, texts(args.lines), f"e5-small-nmt-{args.lines}")


def make_module(folder: Path, args: argparse.Namespace, modules: str):
    from xlpeft.lightning.translation import TranslationAdaptation
    m = TranslationAdaptation(backbone=str(folder), modules=modules, languages=["spa", "nah", "ote"],
                              adapter=args.adapter, encoder_layers=args.encoder_layers,
                              decoder_layers=args.decoder_layers)
    with torch.no_grad():  # non-identity adapters: the routed work is real
        gen = torch.Generator().manual_seed(0)
        for name in m.adapted.adapter_names:
            for module in m.adapted.adapter_modules(name):
                for p in module.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return m


def make_batch(m: Any, size: int, seq: int, mixed: bool) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    vocab = m.adapted.model.config.encoder.vocab_size if hasattr(m.adapted.model.config, "encoder") \
        else m.adapted.model.config.vocab_size
    ids = torch.randint(5, vocab, (size, seq), generator=gen)
    dirs = [DIRECTIONS[i % 4] if mixed else DIRECTIONS[0] for i in range(size)]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(5, vocab, (size, seq), generator=gen),
            "src_langs": [d[0] for d in dirs], "tgt_langs": [d[1] for d in dirs]}


def bench_train(folder: Path, args: argparse.Namespace, budget: float) -> dict[str, Any]:
    m = make_module(folder, args, "monolingual").train()
    batches = {"mixed4": make_batch(m, args.batch, args.seq, True), "one": make_batch(m, args.batch, args.seq, False)}

    def step(batch: dict) -> Any:
        def run() -> None:
            m.training_step(batch, 0).backward()
            m.zero_grad(set_to_none=True)
        return run
    timing = interleave({k: step(b) for k, b in batches.items()}, args.reps, args.warmup, budget)
    return {"timing": timing, "ratio": ratio(timing, "mixed4", "one"), "target": TARGET_TRAIN}


def bench_generate(folder: Path, args: argparse.Namespace, budget: float) -> dict[str, Any]:
    models = {"adapters": make_module(folder, args, "monolingual").eval(), "bare": make_module(folder, args, "none").eval()}
    batch = make_batch(models["bare"], args.batch, args.seq, True)
    kw = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}

    def gen(m: Any) -> Any:
        return lambda: m.generate_ids(batch, **kw)
    timing = interleave({k: gen(m) for k, m in models.items()}, args.reps, args.warmup, budget)
    tokens = args.batch * args.new_tokens
    speed = {k: tokens / summary(v)["median_s"] for k, v in timing["samples"].items()}
    return {"timing": timing, "ratio": ratio(timing, "adapters", "bare"), "tokens_per_s": speed,
            "new_tokens": args.new_tokens}


def tables(results: dict[str, Any]) -> str:
    rows = []
    if "train_mixed4_vs_one" in results:
        rows.append(timing_row("train step: 4 directions mixed / 1 direction",
                               results["train_mixed4_vs_one"]["timing"], "mixed4", "one", TARGET_TRAIN))
    if "generate_adapters_vs_bare" in results:
        rows.append(timing_row("generate: unmerged language adapters / bare",
                               results["generate_adapters_vs_bare"]["timing"], "adapters", "bare", "report"))
    out = md_table(TIMING_HEADERS, rows)
    if "generate_adapters_vs_bare" in results:
        speed = results["generate_adapters_vs_bare"]["tokens_per_s"]
        out += "\n\n" + md_table(["generation", "tokens/s (median)"],
                                 [["bare model", fmt(speed["bare"], 1)], ["language adapters, routed", fmt(speed["adapters"], 1)]])
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=("embedded", "tiny"), default="embedded")
    p.add_argument("--batch", type=int, help="default 8; quick 4")
    p.add_argument("--seq", type=int, help="default 32; quick 12")
    p.add_argument("--new-tokens", type=int, help="generated tokens per example (default 16; quick 4)")
    p.add_argument("--reps", type=int, help="most timed rounds (default 10; quick 3)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 1)")
    p.add_argument("--budget", type=float, help="seconds for all timed rounds (default 120; quick 20)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lines", type=int, default=1000, help="pairs per corpus for vocabulary trimming")
    p.add_argument("--encoder-layers", type=int, default=4)
    p.add_argument("--decoder-layers", type=int, default=2)
    p.add_argument("--adapter", default="pfeiffer", help="adapter preset of each language module")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if args.backbone == "tiny":
        args.encoder_layers, args.decoder_layers = None, None
    return fill_defaults(args, {"batch": 8, "seq": 32, "new_tokens": 16, "reps": 10, "warmup": 1, "budget": 120.0},
                         {"batch": 4, "seq": 12, "new_tokens": 4, "reps": 3, "budget": 20.0})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    setup_torch(args.threads)
    folder = backbone_folder(args)
    budget = Budget(args.budget)
    results = {"train_mixed4_vs_one": bench_train(folder, args, budget.share(2)),
               "generate_adapters_vs_bare": bench_generate(folder, args, budget.share(1))}
    payload = {"benchmark": "nmt", "backbone": args.backbone, "folder": str(folder), "cache": str(BENCH_CACHE),
               "batch": args.batch, "seq": args.seq, "directions": ["-".join(d) for d in DIRECTIONS],
               "env": environment(args.threads), "args": vars(args), "results": results}
    write_report(args.out, f"nmt-{args.backbone}", payload, tables(results))
    return payload


if __name__ == "__main__":
    main()
