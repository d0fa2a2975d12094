"""Batch collators: padding, dynamic MLM masking and per-example language ids.

Every collator keeps a ``langs`` list (one language code per example) next
to the tensors; LightningModules turn it into per-example adapter routing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from xlpeft.errors import XlpeftValueError

IGNORE = -100


def pad(rows: Sequence[Sequence[int]], value: int, multiple: int = 1) -> torch.Tensor:
    """Right-pad integer rows into one tensor (length rounded up to ``multiple``)."""
    width = max(len(r) for r in rows)
    width = -(-width // multiple) * multiple
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


@dataclass
class MLMCollator:
    """BERT-style dynamic masking: 15% of tokens, replaced 80/10/10.

    With ``whole_word`` every piece of a chosen word is masked together
    (words are read from ``word_ids`` rows, as tokenizers' ``word_ids()``;
    ``None`` or ``-1`` marks a token outside any word). With ``seed`` the
    masks of a batch depend only on its token ids and the seed, so every
    evaluation scores the same positions however often the loader is re-run.
    Rows carrying a ``batch_seed`` (``xlpeft.data.resume``) are masked from
    that seed, so a resumed run masks its batches exactly as the original.
    The 10% random replacements of a row whose language is in ``language_ids``
    come from that language's own ids (a new vocabulary: a backbone id would be
    a piece the language never uses); other rows draw from ``range(vocab_size)``.
    """

    mask_id: int
    pad_id: int
    vocab_size: int
    special_ids: tuple[int, ...] = ()
    probability: float = 0.15
    whole_word: bool = False
    pad_to_multiple_of: int = 8
    generator: torch.Generator | None = None
    seed: int | None = None
    language_ids: dict[str, Sequence[int]] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.probability < 1:
            raise XlpeftValueError(f"`probability` must be in (0, 1); got {self.probability}")
        empty = sorted(lang for lang in self.language_ids or {} if not self._pool(lang).numel())
        if empty:
            raise XlpeftValueError(f"`language_ids` can map a language to non-special ids; got none for "
                                   f"{', '.join(empty)}. Drop those languages or give their vocabulary ids")

    def _pool(self, lang: str) -> torch.Tensor:
        """``lang``'s replacement ids, special ids left out."""
        ids = torch.as_tensor(list(self.language_ids[lang]), dtype=torch.long)
        return ids[~torch.isin(ids, torch.tensor(self.special_ids, dtype=torch.long))]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids = pad([r["input_ids"] for r in rows], self.pad_id, self.pad_to_multiple_of)
        attention = (ids != self.pad_id).long()
        for i, r in enumerate(rows):  # a real pad id inside a row stays attended
            attention[i, : len(r["input_ids"])] = 1
        gen = self._generator(ids, rows)
        chosen = self._choose(ids, attention, rows, gen)
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
        langs = [r["lang"] for r in rows]
        inputs = self._corrupt(ids, chosen, gen, langs)
        return {"input_ids": inputs, "attention_mask": attention, "labels": labels, "langs": langs}

    def _generator(self, ids: torch.Tensor, rows: list[dict[str, Any]]) -> torch.Generator | None:
        """The batch's own seed (resumable training loaders), else content-seeded or ``generator``."""
        if "batch_seed" in rows[0]:
            return torch.Generator().manual_seed(int(rows[0]["batch_seed"]))
        return self.generator if self.seed is None else self._batch_generator(ids)

    def _batch_generator(self, ids: torch.Tensor) -> torch.Generator:
        digest = hashlib.sha1(ids.numpy().tobytes()).digest()
        return torch.Generator().manual_seed(int(self.seed) + int.from_bytes(digest[:6], "big"))

    def _choose(self, ids: torch.Tensor, attention: torch.Tensor, rows: list[dict],
                gen: torch.Generator | None) -> torch.Tensor:
        special = torch.isin(ids, torch.tensor(self.special_ids, dtype=torch.long)) | (attention == 0)
        words = [self._words(r, ids.shape[1]) for r in rows] if self.whole_word else None
        if words is None:
            chosen = (torch.rand(ids.shape, generator=gen) < self.probability) & ~special
        else:
            chosen = torch.zeros_like(ids, dtype=torch.bool)
            for i, row_words in enumerate(words):
                picked = {w for w in sorted(set(row_words)) if w >= 0
                          and torch.rand((), generator=gen) < self.probability}
                chosen[i] = torch.tensor([w in picked for w in row_words])
            chosen &= ~special
        for i in range(ids.shape[0]):  # every row contributes at least one target
            if not chosen[i].any():
                candidates = (~special[i]).nonzero().flatten()
                if len(candidates):
                    j = int(candidates[torch.randint(len(candidates), (), generator=gen)])
                    if words is not None and words[i][j] >= 0:  # the whole word of that piece
                        chosen[i] = torch.tensor([w == words[i][j] for w in words[i]]) & ~special[i]
                    chosen[i, j] = True
        return chosen

    @staticmethod
    def _words(row: dict[str, Any], width: int) -> list[int]:
        """A row's word ids padded to ``width`` (-1: no word)."""
        words = row.get("word_ids")
        if words is None:
            raise XlpeftValueError("whole_word masking needs `word_ids` in every row; "
                                   "tokenize with word_ids=True (MLMDataModule(whole_word=True) does)")
        words = [-1 if w is None else int(w) for w in words]
        return words + [-1] * (width - len(words))

    def _corrupt(self, ids: torch.Tensor, chosen: torch.Tensor, gen: torch.Generator | None,
                 langs: list[str]) -> torch.Tensor:
        draw = torch.rand(ids.shape, generator=gen)
        inputs = ids.clone()
        inputs[chosen & (draw < 0.8)] = self.mask_id
        swap = chosen & (draw >= 0.8) & (draw < 0.9)
        random = torch.randint(self.vocab_size, ids.shape, generator=gen)
        for lang in sorted(set(langs) & set(self.language_ids or {})):  # after the shared draw: old rows unchanged
            pool = self._pool(lang)
            rows = torch.tensor([x == lang for x in langs])
            random[rows] = pool[torch.randint(len(pool), ids.shape, generator=gen)][rows]
        inputs[swap] = random[swap]
        return inputs


@dataclass
class ClassificationCollator:
    """Pads ``input_ids``; ``label`` → ``labels`` (sequence) or padded label rows (tokens)."""

    pad_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids = pad([r["input_ids"] for r in rows], self.pad_id, self.pad_to_multiple_of)
        attention = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            attention[i, : len(r["input_ids"])] = 1
        first = rows[0]["label"]
        if isinstance(first, (list, tuple)):
            labels = pad([r["label"] for r in rows], IGNORE, self.pad_to_multiple_of)[:, : ids.shape[1]]
        else:
            labels = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": attention, "labels": labels,
                "langs": [r["lang"] for r in rows]}
