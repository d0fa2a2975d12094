"""Core speed and memory of xlpeft, measured side by side in one process.

    1 frozen backbone + Pfeiffer adapter  vs  full fine-tuning   step time (ideal ≈ 0.67), peak memory
    2 xlpeft LoRA                         vs  HF peft LoRA       step time, same weights (target ≤ 1.0)
    3 batch routed to 8 adapters          vs  one adapter        forward+backward (target ≤ 1.25)
    4 merged LoRA inference               vs  bare backbone      forward (target ≤ 1.02)
    5 compiled routed training step       vs  eager              step time (target ≤ 1.0), graphs
      (opt-in: ``--sections 5``; 2 LoRA adapters, a new per-example mix every step, the
      encoder under ``torch.compile``: a new mix must not compile a new graph)

The ideal for (1) is 2/3: a backward pass costs about two forwards (gradients of
activations and of weights); a frozen backbone skips the weight half.

Loss: cross-entropy at the masked positions only (15 %, fixed per run) through the
MLM head, so the output softmax does not dominate. ``--backbone embedded`` first
trims the vocabulary of the embedded multilingual-e5-small to the pieces of a few
thousand English and Swahili Bible verses (cached under ``/tmp/xlpeft-bench``);
``random`` is a BERT-base-sized random config (768 × 12, vocabulary 8192).

Peak memory (1) is the peak resident set size (``VmHWM``) of a fresh subprocess
per variant, reset after the model is loaded and the inputs built, over three
training steps: it counts gradients, AdamW state, activations and allocator
slack, as the OS sees them. Idle OpenMP threads wait passively
(``OMP_WAIT_POLICY=PASSIVE`` unless set): spinning made 2-thread runs on a loaded
2-core machine 3-7× slower. Usage::

    python scripts/bench_core.py [--backbone embedded|random] [--quick] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from _bench import (  # noqa: I001  (sets up sys.path for xlpeft)
    DEFAULT_OUT, LANGS, TIMING_HEADERS, Budget, bible_lines, embedded_source, environment,
    fill_defaults, fmt, interleave, loadavg, md_table, ratio, reset_peak_rss, rss_mb, setup_torch,
    timing_row, trimmed_backbone, write_report,
)
import torch
import torch.nn.functional as F
from torch import nn

from xlpeft import AdaptedModel
from xlpeft.methods import LoRAConfig

SIZES = {"embedded": None, "random": (768, 12, 12, 3072, 8192), "tiny": (32, 2, 4, 64, 128)}
"""Random configs: hidden, layers, heads, FFN width, vocabulary."""
LORA = LoRAConfig(r=8, alpha=16, targets=("q", "v"))
TARGETS = {"frozen_vs_full": 0.67, "xlpeft_vs_peft": 1.0, "routed8_vs_one": 1.25, "merged_vs_bare": 1.02,
           "compiled_vs_eager": 1.0}


# ----------------------------------------------------------------------------- model and data
def load_base(backbone: str, trimmed: str | None) -> nn.Module:
    """The masked-LM backbone every variant copies (same weights)."""
    from transformers import BertConfig, BertForMaskedLM
    if backbone == "embedded":
        return BertForMaskedLM.from_pretrained(trimmed)
    hidden, layers, heads, ffn, vocab = SIZES[backbone]
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, intermediate_size=ffn))


def make_batch(model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids with 15 % of positions (at least one per row) chosen as MLM targets."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (batch, seq), generator=gen)
    where = torch.rand(batch, seq, generator=gen) < 0.15
    where[:, 1] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "where": where,
            "labels": ids[where]}


def masked_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The encoder, then the MLM head at the masked positions only."""
    out = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return model.cls(out.last_hidden_state[batch["where"]])


def mlm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(masked_logits(model, batch), batch["labels"])


def perturb(model: AdaptedModel, names: list[str], seed: int = 1, scale: float = 0.02) -> None:
    """Non-identity adapters: every weight random, so outputs and gradients are real."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for module in model.adapter_modules(name):
                for p in module.parameters():
                    p.copy_(scale * torch.randn(p.shape, generator=gen))


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
               routing: Callable[[], Any] | None = None) -> Callable[[], None]:
    """Forward, loss, backward, AdamW step, zero grads (optionally inside a routing block)."""
    def step() -> None:
        if routing is None:
            loss = mlm_loss(model, batch)
        else:
            with routing():
                loss = mlm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- 1 frozen vs full
def variant_frozen_vs_full(base: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
    """(owner, HF model): ``full`` trains every parameter; ``adapters`` one Pfeiffer adapter."""
    if name == "full":
        model = copy.deepcopy(base).train().requires_grad_(True)
        return model, model
    adapted = AdaptedModel(copy.deepcopy(base))
    adapted.add_adapter("lang", "pfeiffer", set_active=True)
    adapted.train_adapters("lang")
    adapted.train()
    return adapted, adapted.model


def bench_frozen_vs_full(base: nn.Module, batch: dict, args: argparse.Namespace, budget: float) -> dict:
    steps, params, owners = {}, {}, []
    for name in ("full", "adapters"):
        owner, model = variant_frozen_vs_full(base, name)
        owners.append(owner)
        steps[name] = train_step(model, batch, torch.optim.AdamW(trainable(owner), lr=1e-4))
        params[name] = sum(p.numel() for p in trainable(owner))
    timing = interleave(steps, args.reps, args.warmup, budget)
    memory = {} if args.no_memory else memory_children(("full", "adapters"), args)
    for name, row in memory.items():
        row["trainable_params"] = params[name]
        row["grad_adamw_analytic_mb"] = 12 * params[name] / 2**20
    return {"timing": timing, "ratio": ratio(timing, "adapters", "full"), "memory": memory,
            "trainable_params": params, "target": TARGETS["frozen_vs_full"]}


def memory_children(variants: tuple[str, ...], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Peak RSS of a fresh process per variant (see the module docstring); they run concurrently."""
    base = [sys.executable, __file__, "--backbone", args.backbone, "--batch", str(args.batch),
            "--seq", str(args.seq), "--threads", str(args.threads)]
    base += ["--trimmed", str(args.trimmed)] if args.trimmed else []
    procs = {v: subprocess.Popen([*base, "--child-memory", v], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for v in variants}
    out = {}
    for variant, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"memory subprocess for {variant!r} failed:\n{stderr[-2000:]}")
        out[variant] = json.loads(stdout.strip().splitlines()[-1])
    return out


def run_memory_child(args: argparse.Namespace) -> None:
    setup_torch(args.threads)
    base = load_base(args.backbone, args.trimmed)
    owner, model = variant_frozen_vs_full(base, args.child_memory)
    del base
    batch = make_batch(model, args.batch, args.seq)
    step = train_step(model, batch, torch.optim.AdamW(trainable(owner), lr=1e-4))
    loaded = rss_mb()["rss_mb"]
    reset = reset_peak_rss()
    for _ in range(3):
        step()
    peak = rss_mb()["peak_mb"]
    print(json.dumps({"loaded_rss_mb": loaded, "peak_rss_mb": peak, "train_extra_mb": peak - loaded,
                      "peak_reset_after_load": reset}))


# ----------------------------------------------------------------------------- 2 xlpeft vs peft
def lora_pair(base: nn.Module) -> tuple[AdaptedModel, nn.Module]:
    """The same LoRA (r 8, α 16 on query/value) in xlpeft and in HF peft, weights copied."""
    import peft
    adapted = AdaptedModel(copy.deepcopy(base))
    adapted.add_adapter("a", LORA, set_active=True)
    perturb(adapted, ["a"])
    adapted.train_adapters("a")
    names = {id(m): n for n, m in adapted.model.named_modules()}
    points = [p for p in adapted.points.values() if "a" in p.adapters]
    targets = [names[id(p.linear)] for p in points]
    other = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=0.0, target_modules=targets))
    inner = other.base_model.model
    with torch.no_grad():
        for point, target in zip(points, targets):
            layer = inner.get_submodule(target)
            layer.lora_A["default"].weight.copy_(point.adapters["a"].lora_A.weight)
            layer.lora_B["default"].weight.copy_(point.adapters["a"].lora_B.weight)
    return adapted, inner


def check_same(a: nn.Module, b: nn.Module, bare: nn.Module, batch: dict) -> float:
    """Max |Δ| of the two losses' logits; refuses to time models that differ or do nothing."""
    def logits(m: nn.Module) -> torch.Tensor:
        m.eval()
        with torch.no_grad():
            out = masked_logits(m, batch)
        m.train()
        return out
    x, y, z = logits(a), logits(b), logits(bare)
    diff, effect = (x - y).abs().max().item(), (x - z).abs().max().item()
    if not diff <= 1e-4 * max(1.0, x.abs().max().item()) or effect <= 10 * diff:
        raise RuntimeError(f"xlpeft and peft LoRA outputs differ (max |Δ| {diff:.3g}, "
                           f"adapter effect {effect:.3g}); not timing unequal models")
    return diff


def bench_lora_vs_peft(base: nn.Module, batch: dict, args: argparse.Namespace, budget: float) -> dict:
    adapted, inner = lora_pair(base)
    diff = check_same(adapted.model, inner, base, batch)
    adapted.train()
    inner.train()
    steps = {"xlpeft": train_step(adapted.model, batch, torch.optim.AdamW(trainable(adapted), lr=1e-4)),
             "peft": train_step(inner, batch, torch.optim.AdamW(trainable(inner), lr=1e-4))}
    timing = interleave(steps, args.reps, args.warmup, budget)
    return {"timing": timing, "ratio": ratio(timing, "xlpeft", "peft"), "max_abs_diff": diff,
            "target": TARGETS["xlpeft_vs_peft"]}


# ----------------------------------------------------------------------------- 3 routed vs one
def bench_routed(base: nn.Module, batch: dict, args: argparse.Namespace, budget: float,
                 method: str) -> dict:
    """Forward+backward of one batch: every example on ``a0`` vs spread over 8 adapters."""
    adapted = AdaptedModel(copy.deepcopy(base))
    names = [f"a{i}" for i in range(8)]
    for name in names:
        adapted.add_adapter(name, LORA if method == "lora" else "pfeiffer")
    perturb(adapted, names)
    adapted.train_adapters(*names)
    adapted.train()
    size = batch["input_ids"].shape[0]
    setups = {"one": ["a0"] * size, "routed8": [names[i % 8] for i in range(size)]}

    def step(setup: list[str]) -> Callable[[], None]:
        def run() -> None:
            with adapted.routing(setup, batch_size=size):
                loss = mlm_loss(adapted.model, batch)
            loss.backward()
            adapted.zero_grad(set_to_none=True)
        return run
    timing = interleave({k: step(v) for k, v in setups.items()}, args.reps, args.warmup, budget)
    return {"timing": timing, "ratio": ratio(timing, "routed8", "one"), "method": method,
            "batch": size, "target": TARGETS["routed8_vs_one"]}


# ----------------------------------------------------------------------------- 4 merged vs bare
def bench_merged(base: nn.Module, batch: dict, args: argparse.Namespace, budget: float) -> dict:
    """Inference forward (full MLM logits): bare backbone, merged LoRA, unmerged LoRA."""
    bare = copy.deepcopy(base).eval()
    models = {}
    for name in ("merged", "unmerged"):
        adapted = AdaptedModel(copy.deepcopy(base)).eval()
        adapted.add_adapter("a", LORA, set_active=True)
        perturb(adapted, ["a"])
        models[name] = adapted
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.inference_mode():
        before = models["merged"](**inputs).logits
        models["merged"].merge("a")
        diff = (models["merged"](**inputs).logits - before).abs().max().item()
    if diff > 1e-3 * max(1.0, before.abs().max().item()):
        raise RuntimeError(f"merged and unmerged LoRA outputs differ by {diff:.3g}")

    def forward(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                model(**inputs)
        return run
    timing = interleave({"bare": forward(bare), "merged": forward(models["merged"]),
                         "unmerged": forward(models["unmerged"])}, args.reps, args.warmup, budget)
    return {"timing": timing, "ratio": ratio(timing, "merged", "bare"),
            "unmerged_ratio": ratio(timing, "unmerged", "bare"), "max_abs_merge_diff": diff,
            "target": TARGETS["merged_vs_bare"]}


# ----------------------------------------------------------------------------- 5 compiled vs eager
def mixes_of_two(size: int, count: int = 16) -> list[list[str]]:
    """Per-example mixes of ``a`` and ``b`` over ``size`` examples, each using both."""
    out = [["b" if (k >> i) & 1 else "a" for i in range(size)] for k in range(1, 2 ** size - 1)]
    return out[:count]


def bench_compiled(base: nn.Module, batch: dict, args: argparse.Namespace, budget: float) -> dict:
    """Routed LoRA training step with a new mix every step: compiled encoder vs eager (same model)."""
    import torch._dynamo

    adapted = AdaptedModel(copy.deepcopy(base))
    for name in ("a", "b"):
        adapted.add_adapter(name, LORA)
    perturb(adapted, ["a", "b"])
    adapted.train_adapters("a", "b")
    adapted.train()
    size = batch["input_ids"].shape[0]
    mixes = mixes_of_two(size)
    torch._dynamo.reset()
    encoders = {"compiled": torch.compile(adapted.model.bert, dynamic=False), "eager": adapted.model.bert}

    def loss(encoder: nn.Module, mix: list[str]) -> torch.Tensor:
        with adapted.routing(mix, batch_size=size):
            out = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.cross_entropy(adapted.model.cls(out.last_hidden_state[batch["where"]]), batch["labels"])

    adapted.eval()  # compiled == eager before timing (no dropout: compiled code draws other masks)
    with torch.no_grad():
        diff = max(abs(loss(encoders["compiled"], m) - loss(encoders["eager"], m)).item() for m in mixes[:2])
    adapted.train()

    def step(name: str) -> Callable[[], None]:
        turn = itertools.count()

        def run() -> None:
            loss(encoders[name], mixes[next(turn) % len(mixes)]).backward()
            adapted.zero_grad(set_to_none=True)
        return run
    timing = interleave({k: step(k) for k in encoders}, args.reps, args.warmup, budget)
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    return {"timing": timing, "ratio": ratio(timing, "compiled", "eager"), "graphs": graphs,
            "mixes_seen": min(len(mixes), timing["rounds"] + args.warmup), "max_abs_loss_diff": diff,
            "batch": size, "target": TARGETS["compiled_vs_eager"]}


# ----------------------------------------------------------------------------- report
def tables(results: dict[str, Any]) -> str:
    rows = []
    for key, label, num, den in (
            ("frozen_vs_full", "frozen + Pfeiffer / full FT (train step)", "adapters", "full"),
            ("xlpeft_vs_peft", "xlpeft LoRA / HF peft LoRA (train step)", "xlpeft", "peft"),
            ("routed8_vs_one_pfeiffer", "8 adapters / 1, Pfeiffer (fwd+bwd)", "routed8", "one"),
            ("routed8_vs_one_lora", "8 adapters / 1, LoRA q,v (fwd+bwd)", "routed8", "one"),
            ("merged_vs_bare", "merged LoRA / bare (inference)", "merged", "bare"),
            ("merged_vs_bare", "unmerged LoRA / bare (inference)", "unmerged", "bare"),
            ("compiled_vs_eager", "compiled / eager, routed LoRA (train step, new mix each)",
             "compiled", "eager")):
        if key in results:
            r = results[key]
            sign = "≈ " if key == "frozen_vs_full" else "≤ "
            target = "–" if num == "unmerged" else sign + str(r["target"])
            rows.append(timing_row(label, r["timing"], num, den, target))
    text = md_table(TIMING_HEADERS, rows)
    memory = results.get("frozen_vs_full", {}).get("memory")
    if memory:
        mrows = [[n, f"{m['trainable_params']:,}", fmt(m["loaded_rss_mb"], 0), fmt(m["peak_rss_mb"], 0),
                  fmt(m["train_extra_mb"], 0), fmt(m["grad_adamw_analytic_mb"], 1)]
                 for n, m in memory.items()]
        full, ad = memory["full"], memory["adapters"]
        mrows.append(["ratio adapters / full", "", "", fmt(ad["peak_rss_mb"] / full["peak_rss_mb"]),
                      fmt(ad["train_extra_mb"] / max(full["train_extra_mb"], 1e-9)), ""])
        text += ("\n\nPeak memory of training (fresh process per variant; VmHWM reset after loading "
                 "the model; 3 train steps)\n\n")
        text += md_table(["variant", "trainable params", "RSS loaded MiB", "peak RSS MiB",
                          "training extra MiB", "grads+AdamW (12 B/param) MiB"], mrows)
    return text


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=("embedded", "random", "tiny"), default="embedded",
                   help="embedded e5-small (trimmed vocabulary), BERT-base-sized random, "
                        "or tiny (smoke tests)")
    p.add_argument("--batch", type=int, help="default 8 (embedded, tiny), 4 (random); quick 4")
    p.add_argument("--seq", type=int, help="default 64; quick 32")
    p.add_argument("--reps", type=int, help="most timed rounds per comparison, fewer past --budget "
                                            "(default 15; quick 3)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 1)")
    p.add_argument("--budget", type=float, help="seconds for all timed rounds together (default 150; "
                                                "quick 25); 3 rounds always run")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--lines", type=int, default=2000, help="Bible verses per language for trimming")
    p.add_argument("--sections", default="1,2,3,4", help="comma-separated subset of 1,2,3,4,5 "
                                                           "(5, torch.compile, is opt-in)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--quick", action="store_true", help="smaller defaults: a run under 60 s")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the JSON and Markdown")
    p.add_argument("--trimmed", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not set(args.sections.split(",")) <= {"1", "2", "3", "4", "5"}:
        p.error(f"--sections can hold 1, 2, 3, 4, 5 (comma-separated); got {args.sections!r}")
    batch = 4 if args.backbone == "random" else 8
    return fill_defaults(args, {"batch": batch, "seq": 64, "reps": 15, "warmup": 1, "budget": 150.0},
                         {"batch": 4, "seq": 32, "reps": 3, "budget": 25.0})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.child_memory:
        run_memory_child(args)
        return {}
    setup_torch(args.threads)
    load_start = loadavg()
    if args.backbone == "embedded" and not args.trimmed:
        args.trimmed = str(trimmed_backbone(embedded_source, bible_lines(LANGS, args.lines),
                                            f"e5-small-{'-'.join(LANGS)}-{args.lines}"))
    base = load_base(args.backbone, args.trimmed)
    batch = make_batch(base, args.batch, args.seq)
    routed_batch = make_batch(base, max(8, args.batch), args.seq)
    sections = args.sections.split(",")
    jobs = {"1": [("frozen_vs_full", lambda b: bench_frozen_vs_full(base, batch, args, b))],
            "2": [("xlpeft_vs_peft", lambda b: bench_lora_vs_peft(base, batch, args, b))],
            "3": [(f"routed8_vs_one_{m}", lambda b, m=m: bench_routed(base, routed_batch, args, b, m))
                  for m in ("pfeiffer", "lora")],
            "4": [("merged_vs_bare", lambda b: bench_merged(base, batch, args, b))],
            "5": [("compiled_vs_eager", lambda b: bench_compiled(base, batch, args, b))]}
    todo = [job for s in sections for job in jobs[s]]
    budget = Budget(args.budget)
    results: dict[str, Any] = {}
    for i, (key, job) in enumerate(todo):
        results[key] = job(budget.share(len(todo) - i))
    payload = {"benchmark": "core", "backbone": args.backbone, "trimmed": args.trimmed,
               "batch": args.batch, "seq": args.seq, "loss": "cross-entropy at masked positions (15%)",
               "vocab_size": base.config.vocab_size, "env": environment(args.threads),
               "args": {k: v for k, v in vars(args).items() if k != "child_memory"}, "results": results}
    payload["env"]["loadavg_start"] = load_start
    payload["env"]["loadavg_end"] = payload["env"].pop("loadavg")
    write_report(args.out, f"core-{args.backbone}", payload, tables(results))
    return payload


if __name__ == "__main__":
    main()
