"""Masked-LM training throughput on the embedded backbone, measured side by side.

    A  logits  (a) masked positions only, trimmed vocabulary     ─┐ tokens/s, interleaved
               (b) every position, full 250k vocabulary          ─┘ (+ the two mixed cases)
    B  loop    Lightning Trainer step  vs  identical plain PyTorch loop   (target ≤ 1.05)

Every variant is a ``MaskedLMAdaptation`` training ``madx-language`` adapters for two
languages (English and Swahili Bible text) with per-example routing, batch 16 × 64
packed real tokens (``--seq 128`` for 16 × 128), AdamW. The trimmed backbone keeps
the pieces of a few thousand verses (cached under ``/tmp/xlpeft-bench``); both
models see the same text and masks. Tokens/s counts every input token: rows are
packed verses, so there is no padding.

A Lightning step is timed by a callback from ``on_train_batch_start`` to
``on_train_batch_end`` (training_step, backward, AdamW, zero_grad, LR scheduler,
logging); the plain loop times ``masked_logits`` + cross-entropy + the same work by
hand, in the same ``fit``: each Lightning step is paired with a plain step run just
before or after it (alternately), the first pair dropped. Idle OpenMP threads wait
passively (``OMP_WAIT_POLICY=PASSIVE`` unless set; see ``_bench.py``). Usage::

    python scripts/bench_mlm.py [--seq 128] [--quick] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from typing import Any

from _bench import (  # noqa: I001  (sets up sys.path for xlpeft)
    DEFAULT_OUT, LANGS, Budget, bible_lines, embedded_source, environment, fill_defaults, fmt,
    interleave, loadavg, md_table, mlm_batches, ratio, setup_torch, summary, tiny_unigram_backbone,
    trimmed_backbone, write_report,
)
import lightning as L
import torch
import torch.nn.functional as F

from xlpeft.backbones.trim import load_id_map
from xlpeft.lightning.mlm import MaskedLMAdaptation

TARGET_LOOP = 1.05


# ----------------------------------------------------------------------------- models and data
def backbones(args: argparse.Namespace) -> tuple[str, str, dict[str, list[str]]]:
    """(full-vocabulary folder, trimmed folder, training text)."""
    texts = bible_lines(args.langs, args.lines)
    if args.backbone == "tiny":
        full = str(tiny_unigram_backbone(bible_lines(args.langs, 300)))
        return full, str(trimmed_backbone(lambda: full, texts, f"tiny-trim-{args.lines}")), texts
    full = str(embedded_source())
    trimmed = trimmed_backbone(lambda: full, texts, f"e5-small-{'-'.join(args.langs)}-{args.lines}")
    return full, str(trimmed), texts


def module(path: str, langs: list[str]) -> MaskedLMAdaptation:
    """A fresh MLM module with one seeded ``madx-language`` adapter per language."""
    torch.manual_seed(0)
    return MaskedLMAdaptation(backbone=path, languages=langs, lr=1e-4).train()


def to_full_ids(batches: list[dict], trimmed: str) -> list[dict]:
    """The same batches in the untrimmed vocabulary (trimming keeps the segmentation)."""
    id_map = load_id_map(trimmed)
    old_of = torch.zeros(max(id_map.values()) + 1, dtype=torch.long)
    for old, new in id_map.items():
        old_of[new] = old
    out = []
    for b in batches:
        labels = b["labels"].clone()
        labels[labels != -100] = old_of[labels[labels != -100]]
        out.append({**b, "input_ids": old_of[b["input_ids"]], "labels": labels})
    return out


# ----------------------------------------------------------------------------- steps
def masked_loss(m: MaskedLMAdaptation, batch: dict) -> torch.Tensor:
    """(a): logits at masked positions only (the module's own ``masked_logits``)."""
    logits, targets, _ = m.masked_logits(batch)
    return F.cross_entropy(logits.float(), targets)


def all_positions_loss(m: MaskedLMAdaptation, batch: dict) -> torch.Tensor:
    """(b): the head at every position, as ``AutoModelForMaskedLM`` computes it."""
    logits = m.adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       adapters=m.setups(batch["langs"])).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)


class Stepper:
    """One training step of ``m`` with its own AdamW and a constant LR schedule."""

    def __init__(self, m: MaskedLMAdaptation, loss_fn: Any, batches: list[dict]) -> None:
        self.m, self.loss_fn, self.batches, self.i = m, loss_fn, batches, 0
        self.optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=m.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)

    def __call__(self) -> None:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn(self.m, batch).backward()
        self.optimizer.step()
        self.scheduler.step()


# ----------------------------------------------------------------------------- A logits
def bench_logits(full_path: str, trimmed: str, batches: list[dict], args: argparse.Namespace,
                 budget: float) -> dict[str, Any]:
    small, large = module(trimmed, args.langs), module(full_path, args.langs)
    full_batches = to_full_ids(batches, trimmed)
    variants = {"a_masked_trimmed": Stepper(small, masked_loss, batches),
                "b_all_full": Stepper(large, all_positions_loss, full_batches)}
    if args.decompose:
        variants["masked_full"] = Stepper(large, masked_loss, full_batches)
        variants["all_trimmed"] = Stepper(small, all_positions_loss, batches)
    timing = interleave(variants, args.reps, args.warmup, budget, min_reps=2)
    tokens = batches[0]["input_ids"].numel()
    rows = {}
    for name in variants:
        med = statistics.median(timing["samples"][name])
        rows[name] = {"step_median_s": med, "tokens_per_s": tokens / med,
                      "vocab": (small if "trimmed" in name else large).adapted.model.config.vocab_size}
    return {"timing": timing, "variants": rows, "tokens_per_step": tokens,
            "speedup_a_over_b": ratio(timing, "b_all_full", "a_masked_trimmed"), "module": small}


# ----------------------------------------------------------------------------- B Lightning vs plain
class PairedSteps(L.Callback):
    """Times every Lightning step and pairs it with one plain-loop step run next to it.

    The Lightning step is the wall time from ``on_train_batch_start`` to
    ``on_train_batch_end``. The plain step runs outside that window, before it on
    odd steps and after it on even ones, so neither loop always goes first; it has
    its own AdamW over the same parameters. Training stops early once ``deadline``
    (a ``perf_counter`` value) passes and ``min_steps`` pairs are done.
    """

    def __init__(self, plain: Stepper, deadline: float, min_steps: int) -> None:
        self.plain, self.deadline, self.min_steps = plain, deadline, min_steps
        self.samples: dict[str, list[float]] = {"lightning": [], "plain": []}
        self.threads = 0
        self._t0 = 0.0

    def _plain(self) -> None:
        t0 = time.perf_counter()
        self.plain()
        self.samples["plain"].append(time.perf_counter() - t0)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx % 2:
            self._plain()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.samples["lightning"].append(time.perf_counter() - self._t0)
        self.threads = torch.get_num_threads()
        if batch_idx % 2 == 0:
            self._plain()
        if len(self.samples["plain"]) >= self.min_steps and time.perf_counter() > self.deadline:
            trainer.should_stop = True


def bench_loop(m: MaskedLMAdaptation, batches: list[dict], args: argparse.Namespace,
               budget_s: float) -> dict[str, Any]:
    """One ``Trainer.fit`` of ``--steps`` steps, each paired with a plain step (first pair dropped)."""
    load_start = loadavg()
    pairs = PairedSteps(Stepper(m, masked_loss, batches), time.perf_counter() + budget_s,
                        min_steps=min(args.steps, 13))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[pairs])
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(m, train_dataloaders=loader)
    samples = {k: v[1:] for k, v in pairs.samples.items()}  # first: optimizer state, caches
    timing = {"samples": samples, "loadavg_start": load_start, "loadavg_end": loadavg(),
              "rounds": len(samples["plain"]), "torch_threads_in_fit": pairs.threads}
    tokens = batches[0]["input_ids"].numel()
    return {"timing": timing, "ratio": ratio(timing, "lightning", "plain"), "target": TARGET_LOOP,
            "tokens_per_s": {k: tokens / statistics.median(v) for k, v in samples.items()}}


# ----------------------------------------------------------------------------- report
LABELS = {"a_masked_trimmed": "(a) masked only, trimmed vocab", "b_all_full": "(b) all positions, full vocab",
          "masked_full": "masked only, full vocab", "all_trimmed": "all positions, trimmed vocab"}


def tables(res: dict[str, Any], seq: int, batch: int, langs: list[str]) -> str:
    A, B = res["logits"], res["loop"]
    base = A["variants"]["b_all_full"]["step_median_s"]
    rows = [[LABELS[k], f"{v['vocab']:,}", fmt(v["step_median_s"]), f"{v['tokens_per_s']:.0f}",
             fmt(base / v["step_median_s"], 2)] for k, v in A["variants"].items()]
    t = A["timing"]
    load = f"load {fmt(t['loadavg_start'][0], 1)}→{fmt(t['loadavg_end'][0], 1)}"
    text = (f"MLM train step, batch {batch} × {seq}, madx-language on {len(langs)} languages "
            f"({t['rounds']} rounds, {load})\n\n")
    text += md_table(["logits", "vocab", "step median s", "tokens/s", "speed-up vs (b)"], rows)
    sp = A["speedup_a_over_b"]
    text += (f"\n\n(a) over (b): paired median **{fmt(sp['median_paired_ratio'], 2)}×**, ratio of medians "
             f"{fmt(sp['ratio_of_medians'], 2)}×, ratio of mins {fmt(sp['ratio_of_mins'], 2)}×\n\n")
    bt, r = B["timing"], B["ratio"]
    rows = [[k, fmt(summary(bt["samples"][k])["median_s"]), f"{B['tokens_per_s'][k]:.0f}"]
            for k in ("lightning", "plain")]
    text += (f"Lightning vs plain loop ({bt['rounds']} paired steps, first pair dropped; "
             f"load {fmt(bt['loadavg_start'][0], 1)}→{fmt(bt['loadavg_end'][0], 1)})\n\n")
    text += md_table(["loop", "step median s", "tokens/s"], rows)
    text += (f"\n\nLightning / plain: paired median **{fmt(r['median_paired_ratio'])}**, ratio of "
             f"medians {fmt(r['ratio_of_medians'])}, ratio of mins {fmt(r['ratio_of_mins'])} "
             f"(target ≤ {TARGET_LOOP})")
    return text


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=("embedded", "tiny"), default="embedded",
                   help="embedded e5-small, or tiny (a random 2-layer BERT for smoke tests)")
    p.add_argument("--batch", type=int, help="default 16; quick 4")
    p.add_argument("--seq", type=int, choices=(32, 64, 128), help="default 64; quick 32")
    p.add_argument("--langs", default=",".join(LANGS))
    p.add_argument("--lines", type=int, default=2000, help="Bible verses per language (trimming and text)")
    p.add_argument("--reps", type=int, help="most timed rounds of the logits variants (default 6; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 1)")
    p.add_argument("--steps", type=int, help="most Lightning steps, each paired with a plain one; at "
                                             "least 13 run (default 25; quick 8)")
    p.add_argument("--decompose", action=argparse.BooleanOptionalAction,
                   help="also time masked+full-vocab and all-positions+trimmed (default on; quick off)")
    p.add_argument("--budget", type=float, help="seconds for all timed work, 40 %% logits, the rest the "
                                                "loop; minima always run (default 150; quick 25)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--quick", action="store_true", help="smaller defaults: a run under 60 s")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the JSON and Markdown")
    args = fill_defaults(p.parse_args(argv),
                         {"batch": 16, "seq": 64, "reps": 6, "warmup": 1, "steps": 25, "decompose": True,
                          "budget": 150.0},
                         {"batch": 4, "seq": 32, "reps": 2, "steps": 8, "decompose": False, "budget": 25.0})
    args.langs = [s.strip() for s in args.langs.split(",")]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    setup_torch(args.threads)
    load_start = loadavg()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for pattern in (".*does not have many workers.*", ".*val_dataloader.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", pattern)
    full_path, trimmed, texts = backbones(args)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(trimmed)
    batches = mlm_batches(tokenizer, texts, args.batch, args.seq, args.steps)
    budget = Budget(args.budget)
    logits = bench_logits(full_path, trimmed, batches, args, 0.4 * budget.left())
    small = logits.pop("module")
    loop = bench_loop(small, batches, args, budget.share(1))
    results = {"logits": logits, "loop": loop}
    payload = {"benchmark": "mlm", "backbone": args.backbone, "full": full_path, "trimmed": trimmed,
               "batch": args.batch, "seq": args.seq, "languages": args.langs,
               "adapter": "madx-language", "routing": "per example (languages alternate)",
               "env": environment(args.threads), "args": vars(args), "results": results}
    payload["env"]["loadavg_start"] = load_start
    payload["env"]["loadavg_end"] = payload["env"].pop("loadavg")
    write_report(args.out, f"mlm-{args.backbone}-{args.seq}", payload, tables(results, args.seq, args.batch, args.langs))
    return payload


if __name__ == "__main__":
    main()
