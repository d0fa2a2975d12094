"""Stop training at a NaN or infinite loss, naming the step and the batch's languages.

A batch with no maskable token (a corpus of zero-width characters, lines cut
to special tokens only) gives a NaN loss that silently turns every adapter
weight into NaN. The check costs no host synchronisation on accelerators:
the first bad step is recorded on the device and read every
``log_every_n_steps`` steps (when Lightning syncs for logging anyway), at
epoch end, before a checkpoint is written and at the end of training. On
CPU a check is free, so it runs at every step, before the bad gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from xlpeft.errors import XlpeftValueError

LANGUAGE_KEYS = ("langs", "src_langs", "tgt_langs")


def batch_languages(batch: Any) -> list[str]:
    """Language codes found in a batch (also inside combined loaders' dicts of batches)."""
    found: set[str] = set()
    if isinstance(batch, Mapping):
        for key, value in batch.items():
            if key in LANGUAGE_KEYS and isinstance(value, (list, tuple)):
                found.update(str(v) for v in value)
            elif isinstance(value, Mapping):
                found.update(batch_languages(value))
    return sorted(found)


class LossGuard:
    """Records the first non-finite training loss; ``flush`` raises for it."""

    def __init__(self) -> None:
        self._batches: list[tuple[int, int, int, list[str]]] = []  # step, epoch, batch_idx, languages
        self._first_bad: torch.Tensor | None = None  # index into _batches, -1 while all finite

    def start(self, batch: Any, step: int, epoch: int, batch_idx: int) -> None:
        """Note the batch about to be trained on."""
        self._batches.append((step, epoch, batch_idx, batch_languages(batch)))

    def check(self, loss: torch.Tensor, every: int) -> None:
        """Record (and on CPU or every ``every`` steps, raise for) a non-finite ``loss``."""
        if not self._batches:  # a backward outside Lightning's training batches
            return
        bad = ~torch.isfinite(loss.detach()).all()
        if loss.device.type == "cpu":
            if bad:
                self._raise(len(self._batches) - 1)
            self._batches = self._batches[-1:]
            return
        index = torch.full((), len(self._batches) - 1, device=loss.device)
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, device=loss.device)
        self._first_bad = torch.where(bad & (self._first_bad < 0), index, self._first_bad)
        if len(self._batches) >= max(1, every):
            self.flush()

    def flush(self) -> None:
        """Raise if a recorded loss was not finite; otherwise forget the recorded batches."""
        if self._first_bad is not None:
            first = int(self._first_bad)  # the one host sync
            if first >= 0:
                self._raise(first)
            self._first_bad = None
        self._batches = []

    def _raise(self, index: int) -> None:
        step, epoch, batch_idx, langs = self._batches[index]
        self._batches, self._first_bad = [], None
        raise XlpeftValueError(
            f"the training loss is NaN or infinite at step {step} (epoch {epoch}, batch {batch_idx}; languages in "
            f"the batch: {', '.join(langs) or 'unknown'}); training stopped. Usual causes: examples with no "
            "maskable or label token (text of only zero-width, control or special characters; max_length too "
            "small), a learning rate that is too high, or fp16 overflow (use bf16 or 32-bit precision)")
