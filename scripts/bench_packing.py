"""Padding waste of MLM and genre-task batches, and non-pad tokens/s before and after packing.

1. Pad share (the full embedded tokenizer, the demo's settings): MLM batches of
   ``MLMDataModule(languages, max_length=64, batch_size=16)`` as its training
   loader draws them today, against the same lines packed (``pack_dataset`` +
   ``PackedMLMCollator``) and length-bucketed (``LengthBucketSampler``); genre
   passages (4 verses, ``max_length=128``, batch 16) shuffled vs bucketed.
2. Training throughput (trimmed embedded backbone, one Pfeiffer adapter per
   language routed per row, MLM loss at masked positions, AdamW step): non-pad
   tokens per process CPU second (single-threaded; a shared machine's load
   stretches wall time at random) of plain, bucketed and packed batches, steps
   interleaved.

Usage::

    OMP_NUM_THREADS=1 python scripts/bench_packing.py [--batches 40] [--steps 8]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Iterator
from typing import Any

from _bench import (  # noqa: I001  (sets up sys.path for xlpeft)
    DEFAULT_OUT, LANGS, bible_lines, embedded_source, environment, fmt, md_table, setup_torch,
    trimmed_backbone, write_report,
)
from bench_core import load_base
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from xlpeft import AdaptedModel
from xlpeft.data.collators import ClassificationCollator
from xlpeft.data.datamodules import MLMDataModule
from xlpeft.data.packing import LengthBucketSampler, PackedMLMCollator, pack_dataset


def real_tokens(batch: dict[str, torch.Tensor], pad_id: int) -> int:
    return int((batch["input_ids"] != pad_id).sum())


def lines_in(batch: dict[str, torch.Tensor], pad_id: int) -> int:
    """Lines in a batch: its rows, or (packed) the tokens that start a line."""
    if "position_ids" not in batch:
        return batch["input_ids"].shape[0]
    return int(((batch["position_ids"] == 0) & (batch["input_ids"] != pad_id)).sum())


def share(loader: Iterator[dict], pad_id: int, batches: int) -> dict[str, float]:
    """Pad share and real tokens per row over the first ``batches`` batches."""
    cells = real = rows = 0
    for i, batch in enumerate(loader):
        if i == batches:
            break
        cells += batch["input_ids"].numel()
        real += real_tokens(batch, pad_id)
        rows += batch["input_ids"].shape[0]
    return {"pad_share": 1 - real / cells, "real_tokens_per_row": real / rows,
            "row_length": cells / rows, "batches": min(i + 1, batches)}


def loaders(dm: MLMDataModule, batch_size: int, seed: int = 0) -> dict[str, DataLoader | Iterator]:
    """today (the module's own training loader), bucketed, packed: the same lines."""
    packed_set = pack_dataset(dm.train_set, dm.hparams.max_length)
    packed = PackedMLMCollator(**dm.collator.__dict__)
    lengths = [len(x) for x in dm.train_set["input_ids"]]
    return {"today": dm.train_dataloader(),
            "bucketed": DataLoader(dm.train_set, collate_fn=dm.collator,
                                   batch_sampler=LengthBucketSampler(lengths, batch_size, seed=seed)),
            "packed": DataLoader(packed_set, batch_size=batch_size, shuffle=True, collate_fn=packed,
                                 generator=torch.Generator().manual_seed(seed))}


def mlm_shares(args: argparse.Namespace) -> dict[str, Any]:
    dm = MLMDataModule(list(args.languages), max_length=64, batch_size=16)
    dm.setup("fit")
    pad_id = dm.tokenizer.pad_token_id
    return {name: share(iter(loader), pad_id, args.batches) for name, loader in loaders(dm, 16).items()}


def genre_shares(args: argparse.Namespace) -> dict[str, Any]:
    from xlpeft.data.datamodules import load_tokenizer, tokenize
    from xlpeft.data.genre import genre_examples
    tok = load_tokenizer("embedded")
    rows = genre_examples("eng", "train", max_per_genre=200, passage=4)
    data = tokenize(tok, [r["text"] for r in rows], [r["lang"] for r in rows], 128,
                    extra={"label": [0] * len(rows)})
    collate = ClassificationCollator(pad_id=tok.pad_token_id)
    lengths = [len(x) for x in data["input_ids"]]
    plain = DataLoader(data, batch_size=16, shuffle=True, collate_fn=collate,
                       generator=torch.Generator().manual_seed(0))
    bucketed = DataLoader(data, collate_fn=collate, batch_sampler=LengthBucketSampler(lengths, 16))
    return {"today": share(iter(plain), tok.pad_token_id, args.batches),
            "bucketed": share(iter(bucketed), tok.pad_token_id, args.batches)}


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    trimmed = trimmed_backbone(embedded_source, bible_lines(LANGS, 2000), f"e5-small-{'-'.join(LANGS)}-2000")
    base = load_base("embedded", str(trimmed))
    adapted = AdaptedModel(copy.deepcopy(base))
    for lang in LANGS:
        adapted.add_adapter(lang, "pfeiffer")
    adapted.train_adapters(*LANGS)
    adapted.train()
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-4)
    dm = MLMDataModule(list(LANGS), backbone=str(trimmed), max_length=64, batch_size=args.batch)
    dm.setup("fit")
    pad_id = dm.tokenizer.pad_token_id
    streams = {k: iter(v) for k, v in loaders(dm, args.batch).items()}
    totals = {k: {"seconds": 0.0, "real_tokens": 0, "lines": 0, "steps": 0} for k in streams}

    def step(batch: dict[str, Any]) -> None:
        extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
        with adapted.routing(batch["langs"], batch_size=len(batch["langs"])):
            hidden = adapted.model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        **extra).last_hidden_state
        where = batch["labels"] != -100
        logits = adapted.model.cls(hidden[where])
        F.cross_entropy(logits, batch["labels"][where]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for turn in range(args.steps + 1):  # the first round warms up
        for name, stream in streams.items():
            batch = next(stream)
            start = time.process_time()
            step(batch)
            if turn:
                t = totals[name]
                t["seconds"] += time.process_time() - start
                t["real_tokens"] += real_tokens(batch, pad_id)
                t["lines"] += lines_in(batch, pad_id)
                t["steps"] += 1
    for t in totals.values():
        t["real_tokens_per_s"] = t["real_tokens"] / t["seconds"]
        t["lines_per_s"] = t["lines"] / t["seconds"]
    return totals


def tables(results: dict[str, Any]) -> str:
    rows = []
    for task in ("mlm", "genre"):
        for name, r in results[task].items():
            rows.append([task, name, fmt(r["pad_share"]), fmt(r["real_tokens_per_row"], 1),
                         fmt(r["row_length"], 1), r["batches"]])
    text = md_table(["batches", "variant", "pad share", "real tokens / row", "row length", "batches seen"], rows)
    base = results["throughput"]["today"]["real_tokens_per_s"]
    trows = [[name, t["steps"], fmt(t["seconds"], 2), fmt(t["real_tokens_per_s"], 0), fmt(t["lines_per_s"], 1),
              f"**{fmt(t['real_tokens_per_s'] / base)}**"] for name, t in results["throughput"].items()]
    text += "\n\nTraining throughput (interleaved steps)\n\n"
    text += md_table(["variant", "steps", "seconds", "non-pad tokens/s", "lines/s", "tokens/s vs today"], trows)
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--languages", nargs="+", default=["eng", "swh", "tgl", "nah"])
    p.add_argument("--batches", type=int, default=40, help="batches counted for the pad share")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per variant")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    setup_torch(args.threads)
    results = {"mlm": mlm_shares(args), "genre": genre_shares(args), "throughput": throughput(args)}
    payload = {"benchmark": "packing", "env": environment(args.threads), "args": vars(args), "results": results}
    write_report(args.out, "packing", payload, tables(results))
    return payload


if __name__ == "__main__":
    main()
