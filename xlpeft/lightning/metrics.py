"""Evaluation metrics kept per language (or direction), on device and synced across ranks.

Each key (``"swh"``, ``"eng-swh"``) gets its own set of torchmetrics objects,
created on first use. Updates take tensors and never read them on the host,
so an evaluation step costs no device-to-host synchronisation; states are
summed (or gathered) across ranks at ``compute``, once per epoch, so every
rank reports the scores of the whole evaluation set.

    step:  update(key, tensors)            on device, no host read
    epoch: compute() ─► keys gathered once (ranks may have seen different keys)
                    ─► every rank computes every key's metrics, states synced
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from xlpeft.lightning.spans import span_f1

SEPARATOR = -200.0
"""Marks the end of a sequence in a flattened token-label state."""


class Sums(Metric):
    """A vector of running sums (e.g. summed loss, correct, count), summed across ranks."""

    full_state_update = False

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        self.total += values.detach().to(self.total.dtype)

    def compute(self) -> torch.Tensor:
        return self.total


class Confusion(Metric):
    """A confusion matrix (gold × predicted) updated by ``index_add_``: no host read.

    ``compute`` gives micro accuracy and macro F1 (classes absent from both gold
    and predictions are left out of the mean, as torchmetrics does).
    """

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state("matrix", torch.zeros(num_classes * num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")  # integer counts: never cast by .to(dtype)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds, target = preds.reshape(-1), target.reshape(-1)
        keep = target != self.ignore_index
        index = torch.where(keep, target * self.num_classes + preds, torch.zeros_like(target))
        self.matrix.index_add_(0, index, keep.long())

    def compute(self) -> dict[str, torch.Tensor]:
        m = self.matrix.view(self.num_classes, self.num_classes).double()
        tp = m.diagonal()
        gold, pred = m.sum(1), m.sum(0)
        f1 = 2 * tp / (gold + pred).clamp_min(1)
        seen = (gold + pred) > 0
        return {"accuracy": tp.sum() / m.sum().clamp_min(1),
                "macro_f1": (f1 * seen).sum() / seen.sum().clamp_min(1),
                "examples_or_tokens": m.sum()}


class SpanF1(Metric):
    """Exact-match span F1 of BIO tag sequences (conlleval style), computed once on the host.

    Token labels are gathered as flattened float states (``SEPARATOR`` ends a
    sequence; ignored positions stay ``ignore_index`` and are dropped at compute).
    """

    full_state_update = False

    def __init__(self, labels: list[str], ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.labels, self.ignore_index = list(labels), ignore_index
        self.add_state("preds", [], dist_reduce_fx="cat")
        self.add_state("target", [], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        end = torch.full((target.shape[0], 1), SEPARATOR, device=target.device)
        self.preds.append(torch.cat([preds.float(), end], 1).reshape(-1))
        self.target.append(torch.cat([target.float(), end], 1).reshape(-1))

    def compute(self) -> torch.Tensor:
        preds, target = (torch.cat(s) if isinstance(s, list) else s for s in (self.preds, self.target))
        if isinstance(preds, list) or not preds.numel():
            return torch.tensor(0.0)
        gold_rows, pred_rows = [], []
        g_row, p_row = [], []
        for p, g in zip(preds.long().tolist(), target.long().tolist()):  # one host read per epoch
            if g == SEPARATOR:
                gold_rows.append(g_row)
                pred_rows.append(p_row)
                g_row, p_row = [], []
            elif g != self.ignore_index:
                g_row.append(self.labels[g])
                p_row.append(self.labels[p])
        return torch.tensor(span_f1(gold_rows, pred_rows))


Factory = Callable[[], Mapping[str, Metric]]


class PerKey(nn.Module):
    """One dict of metrics per key, made by ``factory`` on first use (a ``ModuleDict``)."""

    def __init__(self, factory: Factory) -> None:
        super().__init__()
        self.factory = factory
        self.keys_seen = nn.ModuleDict()

    def __getitem__(self, key: str) -> nn.ModuleDict:
        """``key``'s metrics, created (on this module's device) if new."""
        if key not in self.keys_seen:
            self.keys_seen[key] = nn.ModuleDict(dict(self.factory())).to(self._device)
        return self.keys_seen[key]

    _device = torch.device("cpu")

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> PerKey:
        """Follow ``.to(device)`` for metric sets made later."""
        self._device = fn(torch.zeros(0, device=self._device)).device
        return super()._apply(fn, *args, **kwargs)

    def compute(self) -> dict[str, dict[str, Any]]:
        """Every key's values (synced across ranks), then reset."""
        for key in _all_keys(list(self.keys_seen)):
            self[key]
        out: dict[str, dict[str, Any]] = {}
        for key in sorted(self.keys_seen):
            out[key] = {name: metric.compute() for name, metric in self.keys_seen[key].items()}
        for metrics in self.keys_seen.values():
            for metric in metrics.values():
                metric.reset()
        return out


def _all_keys(keys: list[str]) -> list[str]:
    """The keys every rank has seen (one small object gather per epoch under DDP)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return keys
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, sorted(keys))
    return sorted({k for part in parts for k in part})


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """Host integers as a device tensor, copied without waiting for the device (pinned, async)."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def group_rows(keys: list[str], device: torch.device, host: bool = False) -> list[tuple]:
    """``(key, row indices)`` per distinct key of a batch, from host data only (None: all rows).

    ``host=True`` adds the host list of row indices as a third item.
    """
    rows: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        rows.setdefault(key, []).append(i)
    single = len(rows) == 1
    return [(key, None if single else to_device(idx, device), *((idx,) if host else ()))
            for key, idx in rows.items()]
