"""LT-SFT step time and memory against full fine-tuning and a madx-language adapter, side by side.

    full       every backbone parameter trains (AdamW over all of them)
    phase1     LT-SFT phase 1: the eligible parameters train densely (default support:
               no embeddings, LayerNorms or head)
    phase2     LT-SFT phase 2: an SFT of K = |madx-language| entries at random positions of
               the eligible parameters; only its K values train (θ + φ per module call)
    adapter    a madx-language adapter trains (backbone frozen)
    phase2-2g  phase 2 on a batch of two languages under two SFTs: one forward per group
               (what SparseTaskFineTuning does for multi-source batches), one backward
    inference  no-grad forward: bare backbone, under the SFT (θ + φ per module call), and
               with the SFT merged into θ (``model.merge``)

Every variant is one training step (masked-LM forward on every position, cross-entropy,
backward, AdamW step, zero_grad) on the embedded backbone (multilingual-e5-small,
vocabulary trimmed to the benchmark's Bible text and cached under /tmp/xlpeft-bench),
batch 16 × 64 real tokens. Times are interleaved in one process (``_bench.interleave``):
the ratios are medians of per-round ratios. Memory: optimizer state bytes (exact) and
the peak RSS growth of two extra steps after resetting the peak (Linux ``clear_refs``).
Usage::

    python scripts/bench_sft.py [--quick] [--threads 1] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import gc
from typing import Any

from _bench import (  # noqa: I001  (sets up sys.path for xlpeft)
    DEFAULT_OUT, LANGS, TIMING_HEADERS, bible_lines, embedded_source, environment, fill_defaults, fmt,
    interleave, md_table, mlm_batches, reset_peak_rss, rss_mb, setup_torch, timing_row, tiny_unigram_backbone,
    trimmed_backbone, write_report,
)
import torch
import torch.nn.functional as F

from xlpeft import AdaptedModel
from xlpeft.methods.sft import SupportConfig
from xlpeft.ops import sft_select


def build(path: str, variant: str) -> tuple[AdaptedModel, torch.optim.Optimizer, Any]:
    """The model of one variant, its trainable parameters set, and its AdamW."""
    model = AdaptedModel.from_pretrained(path, head="masked-lm")
    model.train()
    if variant == "full":
        model.model.requires_grad_(True)
    elif variant == "phase1":
        for p in sft_select.eligible(model, SupportConfig()).values():
            p.requires_grad_(True)
    elif variant == "adapter":
        model.add_adapter("swh", "madx-language")
        model.train_adapters("swh")
    else:  # phase2 / phase2-2g
        eligible = sft_select.eligible(model, SupportConfig())
        k = sft_select.adapter_size(model, "madx-language")
        gen = torch.Generator().manual_seed(0)
        for lang in LANGS:
            scores = {n: torch.rand(p.shape, generator=gen) for n, p in eligible.items()}
            model.add_sft(lang, sft_select.top_k(scores, k))  # K random eligible entries
        model.train_adapters(*(LANGS if variant == "phase2-2g" else LANGS[:1]))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01), params


def step_fn(model: AdaptedModel, optimizer: torch.optim.Optimizer, batch: dict, variant: str):
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    def loss_of(rows: slice, setup: Any) -> torch.Tensor:
        logits = model(input_ids=ids[rows], attention_mask=mask[rows], adapters=setup).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels[rows].flatten(), reduction="sum")

    def step() -> None:
        n = int((labels != -100).sum())
        if variant == "phase2-2g":  # two language groups, one forward each
            half = ids.shape[0] // 2
            loss = (loss_of(slice(0, half), LANGS[0]) + loss_of(slice(half, None), LANGS[1])) / n
        else:
            setup = {"phase2": LANGS[0], "adapter": "swh"}.get(variant)
            loss = loss_of(slice(None), setup) / n
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def inference(path: str, model: AdaptedModel, batch: dict, reps: int, budget: float) -> dict[str, Any]:
    """No-grad forwards: a bare backbone, ``model`` under SFT ``LANGS[0]`` (per call), a copy with it merged."""
    import copy
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    for module in model.adapter_modules(LANGS[0]):
        module.requires_grad_(False)
    merged = copy.deepcopy(model)
    merged.merge(LANGS[0])
    bare = AdaptedModel.from_pretrained(path, head="masked-lm")
    for m in (model, merged, bare):
        m.eval()

    def run(m: AdaptedModel, setup: Any) -> Any:
        def call() -> None:
            with torch.no_grad():
                m(**kwargs, adapters=setup)
        return call
    return interleave({"bare": run(bare, None), "sft": run(model, LANGS[0]), "merged": run(merged, LANGS[0])},
                      reps=reps, warmup=1, budget_s=budget)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random backbone, few rounds (smoke test)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None, help="seconds for the timing rounds")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = fill_defaults(parser.parse_args(), {"reps": 7, "budget": 150.0}, {"reps": 3, "budget": 20.0})
    setup_torch(args.threads)
    texts = bible_lines(LANGS, 2000 if not args.quick else 100)
    path = str(tiny_unigram_backbone(texts) if args.quick
               else trimmed_backbone(embedded_source, texts, f"e5-small-{'-'.join(LANGS)}-2000"))
    model0 = AdaptedModel.from_pretrained(path, head="masked-lm")
    batches = mlm_batches(model0.tokenizer, texts, 16, 64, 2)
    del model0
    variants = ["full", "phase1", "phase2", "adapter", "phase2-2g"]
    built = {v: build(path, v) for v in variants}
    steps = {v: step_fn(m, o, batches[0], v) for v, (m, o, _) in built.items()}
    memory = {}
    for v in variants:  # one at a time: peak RSS growth of two steps (after a warm-up step)
        steps[v]()
        gc.collect()
        exact = reset_peak_rss()
        before = rss_mb()["rss_mb"]
        steps[v]()
        steps[v]()
        memory[v] = {"optimizer_state_mb": state_bytes(built[v][1]) / 2 ** 20,
                     "trainable": sum(p.numel() for p in built[v][2]),
                     "peak_rss_growth_mb": rss_mb()["peak_mb"] - before if exact else None}
    timing = interleave(steps, reps=args.reps, warmup=1, budget_s=args.budget)
    infer = inference(path, built["phase2"][0], batches[1], args.reps, args.budget / 4)
    pairs = [("full", "phase1"), ("phase2", "full"), ("phase2", "phase1"), ("phase2", "adapter"),
             ("phase1", "adapter"), ("full", "adapter"), ("phase2-2g", "phase2")]
    rows = [timing_row(f"{a} / {b}", timing, a, b, "–") for a, b in pairs]
    rows += [timing_row(f"inference {a} / {b}", infer, a, b, "–")
             for a, b in (("sft", "bare"), ("merged", "bare"), ("merged", "sft"))]
    mem_rows = [[v, f"{memory[v]['trainable']:,}", fmt(memory[v]["optimizer_state_mb"], 1),
                 fmt(memory[v]["peak_rss_growth_mb"], 1)] for v in variants]
    table = (md_table(TIMING_HEADERS, rows) + "\n\n"
             + md_table(["variant", "trainable", "AdamW state MiB", "peak RSS growth MiB (2 steps)"], mem_rows))
    payload = {"backbone": path, "batch": [16, 64], "environment": environment(args.threads),
               "timing": timing, "inference": infer, "memory": memory, "k": memory["phase2"]["trainable"]}
    write_report(args.out, "bench_sft" + ("_quick" if args.quick else ""), payload, table)


if __name__ == "__main__":
    main()
