"""Less padding: same-language lines packed into one row, or batches of similar lengths.

Bible verses and corpus lines are much shorter than ``max_length``, so a padded
batch is mostly pad tokens (``scripts/bench_packing.py`` measures the share).
Two remedies:

``pack_rows`` (masked LM) concatenates lines *of one language* into rows of at
most ``max_length`` tokens (first-fit over lines longest first), each line
keeping its own special tokens. ``PackedMLMCollator`` then gives every row a
block-diagonal attention mask and position ids that restart at each line, so a
packed line sees exactly what it saw alone (``tests/test_packing.py``: packed
rows equal unpacked rows); a row holds one language, so per-example language
routing stays per row::

    row  [CLS a₁ a₂ SEP][CLS b₁ SEP][CLS c₁ c₂ c₃ SEP] pad pad      (all `swh`)
    pos   0   1  2  3    0   1  2    0   1  2  3  4
    mask  block-diagonal [B, 1, L, L] (bool, True = attend); pad rows/cols all False

The mask is 4-D, which transformers 5 passes to attention as it is
(``masking_utils``: "if the mask is already 4D, simply return as-is"); boolean
masks suit the ``sdpa`` attention the backbones load with (``eager`` attention
adds the mask: pass ``mask_dtype`` for an additive float mask). The model call
must pass ``position_ids`` along with the mask.

``LengthBucketSampler`` (classification, where an example is one pooled
sequence) sorts windows of shuffled examples by length before cutting them into
batches, so each batch pads to a length close to its own examples'.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from xlpeft.data.collators import MLMCollator
from xlpeft.errors import XlpeftValueError


# --------------------------------------------------------------------------- packing
def pack_rows(rows: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Lines grouped by ``lang`` and packed first-fit (longest first) into rows of ≤ ``max_length``.

    Each packed row has ``input_ids`` (the lines concatenated), ``segments`` (their
    lengths, in order), ``lang`` and, when the lines have them, ``word_ids`` made
    distinct across lines. Other columns are dropped. Deterministic: same lines, same rows.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise XlpeftValueError(f"`max_length` can be a positive integer; got {max_length!r}")
    by_lang: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        if n > max_length:
            raise XlpeftValueError(
                f"a line can be packed when it has at most max_length={max_length} tokens; line {i} has {n}. "
                "Tokenize with truncation to max_length first")
        if n:
            by_lang.setdefault(row["lang"], []).append(i)
    packed = []
    for lang in sorted(by_lang):
        for members in _first_fit(by_lang[lang], [len(r["input_ids"]) for r in rows], max_length):
            packed.append(_join([rows[i] for i in members], lang))
    return packed


def _first_fit(indices: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing bins of ``indices`` (stable: ties keep input order)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda j: -lengths[j]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]  # corpus order inside a row


def _join(lines: list[dict[str, Any]], lang: str) -> dict[str, Any]:
    out: dict[str, Any] = {"input_ids": [t for r in lines for t in r["input_ids"]],
                           "segments": [len(r["input_ids"]) for r in lines], "lang": lang}
    if all("word_ids" in r for r in lines):
        words, offset = [], 0
        for r in lines:
            ids = [-1 if w is None else int(w) for w in r["word_ids"]]
            words += [w + offset if w >= 0 else -1 for w in ids]
            offset += max([w + 1 for w in ids if w >= 0], default=0)
        out["word_ids"] = words
    return out


def pack_dataset(data: Any, max_length: int) -> Any:
    """``pack_rows`` over a ``datasets.Dataset`` (or a list of rows), as the same kind."""
    rows = list(data) if isinstance(data, list) else [data[i] for i in range(len(data))]
    packed = pack_rows(rows, max_length)
    if isinstance(data, list):
        return packed
    from datasets import Dataset
    return Dataset.from_list(packed) if packed else Dataset.from_dict({"input_ids": [], "segments": [], "lang": []})


def segment_ids(segments: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """``[B, width]``: the line index of every token (-1 on padding)."""
    out = torch.full((len(segments), width), -1, dtype=torch.long)
    for b, lengths in enumerate(segments):
        start = 0
        for s, n in enumerate(lengths):
            out[b, start:start + n] = s
            start += n
    return out


def block_mask(seg: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, 1, L, L]`` block-diagonal mask from ``segment_ids``: bool, or additive in ``dtype``."""
    same = (seg[:, :, None] == seg[:, None, :]) & (seg >= 0)[:, :, None] & (seg >= 0)[:, None, :]
    same = same[:, None]
    if dtype is None:
        return same
    return torch.zeros(same.shape, dtype=dtype).masked_fill(~same, torch.finfo(dtype).min)


def restart_positions(segments: Sequence[Sequence[int]], width: int, offset: int = 0) -> torch.Tensor:
    """``[B, width]`` position ids counting from ``offset`` inside every line (``offset`` on padding).

    BERT-style models count from 0; XLM-R counts from its ``padding_idx + 1``.
    """
    out = torch.full((len(segments), width), offset, dtype=torch.long)
    for b, lengths in enumerate(segments):
        start = 0
        for n in lengths:
            out[b, start:start + n] = torch.arange(offset, offset + n)
            start += n
    return out


@dataclass
class PackedMLMCollator(MLMCollator):
    """``MLMCollator`` for packed rows (``segments``): block mask, restarting positions.

    Rows without ``segments`` are collated as ``MLMCollator`` does. Each packed row
    gets at least one masked token (not each line); every line's special tokens stay
    unmasked, as in an unpacked batch.
    """

    mask_dtype: torch.dtype | None = None
    """None: a boolean mask (``sdpa``); a float dtype: an additive mask (``eager`` attention)."""
    position_offset: int = 0
    """First position id of a line: 0 for BERT-style models, ``pad_id + 1`` for XLM-R."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(rows)
        if "segments" not in rows[0]:
            return batch
        segments, width = [r["segments"] for r in rows], batch["input_ids"].shape[1]
        batch["attention_mask"] = block_mask(segment_ids(segments, width), self.mask_dtype)
        batch["position_ids"] = restart_positions(segments, width, self.position_offset)
        return batch


COUNT_FROM_PADDING = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "xmod")
"""Model types whose position ids start at ``padding_idx + 1`` (RoBERTa-style embeddings)."""


def position_offset(model_type: str, pad_id: int) -> int:
    """The first position id of a sequence for a backbone of ``model_type``."""
    return pad_id + 1 if model_type in COUNT_FROM_PADDING else 0


def packed_collator(collator: MLMCollator, backbone: str) -> PackedMLMCollator:
    """``collator`` for packed rows, with the position convention of ``backbone``'s config."""
    from transformers import AutoConfig

    from xlpeft.backbones.embedded import backbone_path
    model_type = AutoConfig.from_pretrained(backbone_path(backbone)).model_type
    fields = {k: v for k, v in collator.__dict__.items() if k in MLMCollator.__dataclass_fields__}
    return PackedMLMCollator(**fields, position_offset=position_offset(model_type, collator.pad_id))


# --------------------------------------------------------------------------- bucketing
class LengthBucketSampler(Sampler[list[int]]):
    """Batches of similar lengths: shuffle, sort windows of ``window`` batches by length, cut, shuffle.

    A batch sampler (``DataLoader(batch_sampler=...)``); epoch ``e`` is a function
    of ``(seed, e)`` alone (``set_epoch``), so a run can be repeated exactly.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, window: int = 50, seed: int = 0,
                 drop_last: bool = False) -> None:
        for name, value in (("batch_size", batch_size), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise XlpeftValueError(f"`{name}` can be a positive integer; got {value!r}")
        self.lengths, self.batch_size, self.window = list(lengths), batch_size, window
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full if self.drop_last or not rest else full + 1  # upper bound with windows
