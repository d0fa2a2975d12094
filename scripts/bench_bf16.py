"""bf16 on CPU: Lightning ``bf16-mixed`` adapter training and inference against float32.

Three copies of one model (trimmed embedded backbone, one Pfeiffer adapter, the
same non-identity initial weights) see the same batches, steps interleaved:

    fp32         everything float32
    bf16-mixed   Lightning's ``MixedPrecision("bf16-mixed", "cpu")``: its forward context
                 (autocast to bfloat16) around forward and loss, float32 weights and optimiser
    bf16-weights the backbone's weights in bfloat16, adapters float32 (xlpeft's placement
                 policy: casts at the adapter boundary), no autocast

Times are process CPU seconds of this single-threaded process (a shared machine's
load stretches wall time at random). ``train``: forward, masked-LM loss (15 % of positions, the MLM head), backward,
AdamW step; ``--steps`` steps record each variant's loss curve, compared to fp32's
(the ``bf16`` ones are the same batches). ``infer``: no-grad forward, full logits.
Usage::

    OMP_NUM_THREADS=1 python scripts/bench_bf16.py [--steps 50] [--batch 8] [--seq 64]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

from _bench import (  # noqa: I001  (sets up sys.path for xlpeft)
    DEFAULT_OUT, LANGS, bible_lines, embedded_source, environment, fmt, md_table, setup_torch,
    trimmed_backbone, write_report,
)
from bench_core import load_base, make_batch, mlm_loss, perturb
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from xlpeft import AdaptedModel

VARIANTS = ("fp32", "bf16-mixed", "bf16-weights")


def build(base: torch.nn.Module, variant: str) -> tuple[AdaptedModel, Callable[[], Any]]:
    """The model of ``variant`` and its forward context."""
    model = copy.deepcopy(base)
    if variant == "bf16-weights":
        model = model.to(torch.bfloat16)
    adapted = AdaptedModel(model)
    adapted.add_adapter("a", "pfeiffer", set_active=True)
    perturb(adapted, ["a"])  # same seed: same float32 adapter weights in every variant
    adapted.train_adapters("a")
    if variant == "bf16-mixed":
        plugin = MixedPrecision("bf16-mixed", "cpu")
        return adapted, plugin.forward_context
    return adapted, contextlib.nullcontext


def loss_curves(models: dict, batches: list[dict], lr: float) -> dict[str, dict[str, Any]]:
    """Train every variant on the same batches, steps interleaved; losses and step times."""
    optims = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
              for k, (m, _) in models.items()}
    out = {k: {"loss": [], "seconds": []} for k in models}
    for i, batch in enumerate(batches):
        order = list(models)[i % len(models):] + list(models)[:i % len(models)]
        for name in order:
            model, context = models[name]
            model.train()
            start = time.process_time()
            with context():
                loss = mlm_loss(model.model, batch)
            loss.float().backward()
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)
            out[name]["seconds"].append(time.process_time() - start)
            out[name]["loss"].append(float(loss.detach()))
    return out


def inference(models: dict, batch: dict, rounds: int) -> dict[str, list[float]]:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(rounds + 1):
        for name, (model, context) in models.items():
            model.eval()
            start = time.process_time()
            with torch.inference_mode(), context():
                model(**inputs)
            if r:
                times[name].append(time.process_time() - start)
    return times


def summary(curves: dict, infer: dict, warm: int) -> dict[str, Any]:
    ref = curves["fp32"]
    out = {}
    for name, c in curves.items():
        step = statistics.median(c["seconds"][warm:])
        diffs = [abs(a - b) for a, b in zip(c["loss"], ref["loss"])]
        out[name] = {
            "train_step_median_s": step,
            "train_ratio_vs_fp32": statistics.median(
                a / b for a, b in zip(c["seconds"][warm:], ref["seconds"][warm:])),
            "infer_median_s": statistics.median(infer[name]),
            "infer_ratio_vs_fp32": statistics.median(a / b for a, b in zip(infer[name], infer["fp32"])),
            "max_abs_loss_diff": max(diffs), "mean_abs_loss_diff": statistics.mean(diffs),
            "first_loss": c["loss"][0], "last5_mean_loss": statistics.mean(c["loss"][-5:]),
        }
    return out


def tables(s: dict[str, Any], steps: int) -> str:
    rows = [[n, fmt(r["train_step_median_s"]), f"**{fmt(r['train_ratio_vs_fp32'])}**", fmt(r["infer_median_s"]),
             f"**{fmt(r['infer_ratio_vs_fp32'])}**", fmt(r["first_loss"]), fmt(r["last5_mean_loss"]),
             fmt(r["max_abs_loss_diff"], 4), fmt(r["mean_abs_loss_diff"], 4)] for n, r in s.items()]
    return md_table(["variant", "train step s", "train / fp32", "inference s", "inference / fp32",
                     "loss step 1", f"loss, mean of steps {steps - 4}-{steps}", "max |Δloss| vs fp32",
                     "mean |Δloss| vs fp32"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--infer-rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    setup_torch(args.threads)
    trimmed = trimmed_backbone(embedded_source, bible_lines(LANGS, 2000), f"e5-small-{'-'.join(LANGS)}-2000")
    base = load_base("embedded", str(trimmed))
    models = {v: build(base, v) for v in VARIANTS}
    batches = [make_batch(base, args.batch, args.seq, seed=i % 10) for i in range(args.steps)]
    curves = loss_curves(models, batches, args.lr)
    infer = inference(models, batches[0], args.infer_rounds)
    result = summary(curves, infer, warm=2)
    payload = {"benchmark": "bf16", "env": environment(args.threads), "args": vars(args),
               "cpu_bf16": torch.backends.mkldnn.is_available(), "results": result, "curves": curves}
    write_report(args.out, "bf16", payload, tables(result, args.steps))
    return payload


if __name__ == "__main__":
    main()
