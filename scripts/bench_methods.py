"""Training memory and step time of the methods of issue 15, side by side against a Pfeiffer adapter.

    every variant: one MLM training step (forward, cross-entropy at 15 % masked positions
    through the frozen MLM head, backward, AdamW step) on the same backbone and batch

Per variant (ratios to ``pfeiffer``, measured in one process):

* trainable parameters;
* activation memory: bytes of the tensors autograd keeps for backward during the
  forward (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once,
  the model's own weights excluded) — what Ladder Side-Tuning saves by never
  backpropagating through the backbone;
* optimizer-side memory: gradients + AdamW's two moments, 12 bytes per trainable
  parameter (fp32);
* step time, interleaved rounds (``_bench.interleave``), median of paired ratios.

All adapters sit on one ``AdaptedModel`` (one copy of the backbone); each step
activates its own. Ladder Side-Tuning runs the same encoder with adapters
disabled under ``no_grad`` and feeds the MLM head with its side-tuned output.
Peak RSS is not measured here (``scripts/bench_core.py`` does that for Pfeiffer
vs full fine-tuning). Usage::

    OMP_NUM_THREADS=1 python scripts/bench_methods.py [--backbone embedded|tiny] [--quick]
    python scripts/bench_methods.py --counts   # trainable parameters of each preset on the full
                                               # embedded backbone (AdaptedModel.from_pretrained("embedded"))
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from _bench import (  # noqa: I001  (sets up sys.path for xlpeft)
    DEFAULT_OUT, LANGS, Budget, bible_lines, embedded_source, environment, fmt, interleave,
    md_table, ratio, setup_torch, trimmed_backbone, write_report,
)
import torch
import torch.nn.functional as F
from torch import nn

from xlpeft import AdaptedModel
from xlpeft.methods import LadderSideTuning, adapter_drop, preset
from xlpeft.errors import XlpeftValueError
from xlpeft.methods.presets import s4_config

BASELINE = "pfeiffer"
PRESETS = ("pfeiffer", "lora", "dora", "vera", "loha", "lokr", "krona", "loreft", "adamix", "adamix-lora", "said",
           "far", "intrinsic-prompt")


def load_base(backbone: str, trimmed: str | None) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM
    if backbone == "embedded":
        return BertForMaskedLM.from_pretrained(trimmed)
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=4,
                                      num_attention_heads=4, intermediate_size=64))


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=gen)
    where = torch.rand(batch, seq, generator=gen) < 0.15
    where[:, 1] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "where": where, "labels": ids[where]}


def variants(base: nn.Module) -> tuple[AdaptedModel, dict[str, tuple[list[nn.Parameter], Callable]]]:
    """name → (its trainable parameters, a function batch → loss)."""
    am = AdaptedModel(base)
    layers = base.config.num_hidden_layers
    configs = {name: preset(name) for name in PRESETS}
    configs["s4"] = s4_config(layers)
    configs["pfeiffer-drop-half"] = adapter_drop(preset("pfeiffer"), layers // 2)
    gen = torch.Generator().manual_seed(1)
    out: dict[str, tuple[list[nn.Parameter], Callable]] = {}
    for name, config in list(configs.items()):
        key = name.replace("-", "_")
        try:
            am.add_adapter(key, config)
        except XlpeftValueError as err:  # e.g. VeRA's r=256 on a 32-wide tiny backbone
            print(f"[bench_methods] {name} skipped on this backbone: {err}")
            del configs[name]
            continue
        params = [p for m in am.adapter_modules(key) for p in m.parameters()]
        with torch.no_grad():  # non-identity, so gradients flow everywhere
            for p in params:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))

        def loss(batch: dict, key: str = key) -> torch.Tensor:
            am.set_active(key)
            states = am.model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return F.cross_entropy(am.model.cls(states.last_hidden_state[batch["where"]]), batch["labels"])
        out[name] = (params, loss)
    am.train_adapters(*[n.replace("-", "_") for n in configs])
    am.train()
    ladder = LadderSideTuning(am.model.bert, preset("ladder")).train()

    def ladder_loss(batch: dict) -> torch.Tensor:
        with am.disable_adapters():
            states = ladder(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(am.model.cls(states[batch["where"]]), batch["labels"])
    out["ladder"] = (list(ladder.side.parameters()), ladder_loss)
    return am, out


def saved_bytes(loss_fn: Callable, batch: dict, model: nn.Module) -> int:
    """Bytes autograd keeps for backward in one forward (each storage once, model weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(batch)
    loss.backward()
    return sum(seen.values())


def step(params: list[nn.Parameter], loss_fn: Callable, batch: dict) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def run() -> None:
        loss_fn(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def table(rows: dict[str, dict[str, Any]]) -> str:
    headers = ["method", "trainable params", "activations MB", "× pfeiffer", "grads+AdamW MB",
               "activations + grads+AdamW × pfeiffer", "step s (median)", "step × pfeiffer (paired median)"]
    return md_table(headers, [[n, f"{r['trainable']:,}", fmt(r["activations_mb"], 2), fmt(r["activations_ratio"]),
                               fmt(r["optimizer_mb"], 2), fmt(r["memory_ratio"]), fmt(r["step_s"]),
                               fmt(r["step_ratio"])] for n, r in rows.items()])


COUNTED = ("pfeiffer", "lora", "krona", "loreft", "adamix", "adamix-lora", "said", "far", "intrinsic-prompt",
           "s4", "pfeiffer-drop5")


def counts() -> dict[str, int]:
    """Trainable parameters of each preset (and of the ladder side network) on the embedded backbone."""
    am = AdaptedModel.from_pretrained("embedded", head="masked-lm")
    out = {}
    for name in COUNTED:
        key = name.replace("-", "_")
        am.add_adapter(key, name)
        am.train_adapters(key)
        out[name] = sum(p.numel() for p in am.parameters() if p.requires_grad)
    out["ladder"] = sum(p.numel() for p in LadderSideTuning(am.model.bert, preset("ladder")).side.parameters())
    print(md_table(["preset", "trainable parameters (embedded, masked-lm)"], [[n, f"{c:,}"] for n, c in out.items()]))
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=("embedded", "tiny"), default="embedded")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--reps", type=int, default=5, help="most timed rounds")
    p.add_argument("--budget", type=float, default=240, help="seconds for the timed rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lines", type=int, default=2000, help="Bible verses per language for trimming")
    p.add_argument("--quick", action="store_true", help="batch 4 × 32, 3 rounds")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--counts", action="store_true", help="only print trainable counts on the embedded backbone")
    p.add_argument("--only", default=None, help="comma-separated variants to time (pfeiffer, the baseline, always)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.reps = 4, 32, 3
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    setup_torch(args.threads)
    if args.counts:
        return {"counts": counts()}
    trimmed = None
    if args.backbone == "embedded":
        trimmed = str(trimmed_backbone(embedded_source, bible_lines(LANGS, args.lines),
                                       f"e5-small-{'-'.join(LANGS)}-{args.lines}"))
    base = load_base(args.backbone, trimmed)
    batch = make_batch(base.config.vocab_size, args.batch, args.seq)
    am, methods = variants(base)
    if args.only:
        keep = {BASELINE, *args.only.split(",")}
        unknown = sorted(keep - set(methods))
        if unknown:
            raise SystemExit(f"--only: unknown variants {unknown}; known: {', '.join(methods)}")
        methods = {n: v for n, v in methods.items() if n in keep}
    memory = {n: saved_bytes(fn, batch, am) for n, (_, fn) in methods.items()}
    am.zero_grad(set_to_none=True)
    timing = interleave({n: step(params, fn, batch) for n, (params, fn) in methods.items()},
                        reps=args.reps, warmup=1, budget_s=Budget(args.budget).share(1))
    rows = {}
    for name, (params, _) in methods.items():
        count = sum(p.numel() for p in params)
        acts, opt = memory[name] / 2 ** 20, 12 * count / 2 ** 20
        base_acts = memory[BASELINE] / 2 ** 20
        base_opt = 12 * sum(p.numel() for p in methods[BASELINE][0]) / 2 ** 20
        rows[name] = {"trainable": count, "activations_mb": acts, "activations_ratio": acts / base_acts,
                      "optimizer_mb": opt, "memory_ratio": (acts + opt) / (base_acts + base_opt),
                      "step_s": timing["median_s"][name],
                      "step_ratio": ratio(timing, name, BASELINE)["median_paired_ratio"]}
    payload = {"benchmark": "methods", "backbone": args.backbone, "trimmed": trimmed, "batch": args.batch,
               "seq": args.seq, "env": environment(args.threads), "rounds": timing["rounds"],
               "loadavg": [timing["loadavg_start"], timing["loadavg_end"]], "rows": rows}
    write_report(args.out, f"methods-{args.backbone}", payload, table(rows))
    return payload


if __name__ == "__main__":
    main()
