"""Benchmark: generator-driven adapters vs static bottleneck adapters, side by side.

The static adapter is the generated one materialised (same config, same
weights: outputs are checked equal), so only the weight source differs.

1. inference, one language: generated (weights cached per language) vs static
   — target ≤ 1.15;
2. inference, a batch routed to 4 languages: generated vs 4 static adapters;
3. inference with the cache cleared before every forward (cold generation);
4. one training step (forward, masked-LM loss, backward, AdamW): the generator
   is re-run every step; the static baseline trains one adapter per language.

    python scripts/bench_generators.py [--backbone embedded|tiny] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _bench import (
    DEFAULT_OUT, LANGS, TIMING_HEADERS, Budget, bible_lines, embedded_source, environment, fill_defaults,
    interleave, loadavg, md_table, ratio, setup_torch, timing_row, trimmed_backbone, write_report,
)
import torch  # noqa: E402

from bench_core import load_base, make_batch, mlm_loss  # noqa: E402
from xlpeft import AdaptedModel  # noqa: E402
from xlpeft.generators import build_generator  # noqa: E402

ROUTED = ("swh", "tgl", "ind", "tur")
TARGETS = {"inference_one": "≤ 1.15", "inference_routed4": "≤ 1.15", "inference_cold": "report",
           "train_step": "report"}


def build(base: torch.nn.Module, kind: str, shake: float = 0.02) -> tuple[AdaptedModel, Any]:
    """One model holding generated adapters and their materialised static copies."""
    am = AdaptedModel(base)
    extra = {"basis": 16} if kind == "madg" else {}
    gen = build_generator(kind, am, reduction_factor=16, **extra)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in gen.parameters():
            p.add_(shake * torch.randn(p.shape, generator=g))
    task = "mlm" if kind == "hyperx" else ""
    with tempfile.TemporaryDirectory() as tmp:
        for lang in ROUTED:
            gen.attach(am, lang, task, name=lang)
            am.load_adapter(str(gen.materialise(lang, Path(tmp) / lang, task=task)), name=f"static_{lang}")
    am.eval()
    return am, gen


def forward(am: AdaptedModel, batch: dict, names: list[str], before: Callable[[], None] | None = None):
    def run() -> None:
        if before is not None:
            before()
        with torch.no_grad():
            am(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapters=names)
    return run


def train_step(am: AdaptedModel, batch: dict, names: list[str]) -> Callable[[], None]:
    """AdamW over the routed adapters' parameters (the generator for generated ones)."""
    params = list({id(p): p for n in set(names) for m in am.adapter_modules(n) for p in m.parameters()}.values())
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        with am.routing(names, batch_size=batch["input_ids"].shape[0]):
            loss = mlm_loss(am.model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench(am: AdaptedModel, gen: Any, batch: dict, args: argparse.Namespace, budget: Budget) -> dict:
    n = batch["input_ids"].shape[0]
    one, static_one = [ROUTED[0]] * n, [f"static_{ROUTED[0]}"] * n
    mixed = [ROUTED[i % len(ROUTED)] for i in range(n)]
    static_mixed = [f"static_{x}" for x in mixed]
    with torch.no_grad():
        out = {k: am(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapters=v)
               for k, v in (("g", mixed), ("s", static_mixed))}
        key = "logits" if "logits" in out["g"] else "last_hidden_state"
        diff = float((out["g"][key] - out["s"][key]).abs().max())
    jobs = {
        "inference_one": {"generated": forward(am, batch, one), "static": forward(am, batch, static_one)},
        "inference_routed4": {"generated": forward(am, batch, mixed), "static": forward(am, batch, static_mixed)},
        "inference_cold": {"generated": forward(am, batch, one, gen.clear_cache),
                           "static": forward(am, batch, static_one)},
    }
    results: dict[str, Any] = {"max_abs_diff_generated_vs_materialised": diff}
    todo = list(jobs) + ["train_step"]
    for i, name in enumerate(todo):
        share = budget.share(len(todo) - i)
        if name == "train_step":
            am.train().train_adapters(*sorted(set(mixed) | set(static_mixed)))
            variants = {"generated": train_step(am, batch, mixed), "static": train_step(am, batch, static_mixed)}
        else:
            variants = jobs[name]
        timing = interleave(variants, args.reps, args.warmup, share)
        results[name] = {"timing": timing, "ratio": ratio(timing, "generated", "static")}
    return results


def tables(results: dict[str, Any], params: dict[str, int]) -> str:
    rows = [timing_row(f"{k}: generated / static", v["timing"], "generated", "static", TARGETS[k])
            for k, v in results.items() if isinstance(v, dict)]
    text = md_table(TIMING_HEADERS, rows)
    text += (f"\n\nmax |generated − materialised| over the routed batch: "
             f"{results['max_abs_diff_generated_vs_materialised']:.2e}\n\n"
             + md_table(["parameters", "count"], [[k, f"{v:,}"] for k, v in params.items()]))
    return text


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=("embedded", "tiny"), default="embedded")
    p.add_argument("--generator", choices=("madg", "hyperx"), default="madg")
    p.add_argument("--batch", type=int, help="default 8; quick 4")
    p.add_argument("--seq", type=int, help="default 64; quick 32")
    p.add_argument("--reps", type=int, help="most timed rounds per comparison (default 15; quick 3)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 1)")
    p.add_argument("--budget", type=float, help="seconds for all timed rounds (default 120; quick 20)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lines", type=int, default=2000)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    return fill_defaults(args, {"batch": 8, "seq": 64, "reps": 15, "warmup": 1, "budget": 120.0},
                         {"batch": 4, "seq": 32, "reps": 3, "budget": 20.0})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    setup_torch(args.threads)
    load_start = loadavg()
    trimmed = None
    if args.backbone == "embedded":
        trimmed = str(trimmed_backbone(embedded_source, bible_lines(LANGS, args.lines),
                                       f"e5-small-{'-'.join(LANGS)}-{args.lines}"))
        base = load_base("embedded", trimmed)
    else:
        base = load_base("tiny", None)
    batch = make_batch(base, args.batch, args.seq)
    am, gen = build(base, args.generator)
    params = {"generator": sum(p.numel() for p in gen.parameters()),
              "one generated/static adapter": gen.adapter_parameters(),
              f"{len(ROUTED)} static adapters": gen.adapter_parameters() * len(ROUTED)}
    results = bench(am, gen, batch, args, Budget(args.budget))
    payload = {"benchmark": "generators", "backbone": args.backbone, "trimmed": trimmed,
               "generator": args.generator, "batch": args.batch, "seq": args.seq, "params": params,
               "env": environment(args.threads), "args": vars(args), "results": results}
    payload["env"]["loadavg_start"] = load_start
    payload["env"]["loadavg_end"] = payload["env"].pop("loadavg")
    write_report(args.out, f"generators-{args.backbone}-{args.generator}", payload, tables(results, params))
    return payload


if __name__ == "__main__":
    main()
