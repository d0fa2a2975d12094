"""Task adaptation and zero-shot cross-lingual transfer (MAD-X steps 2–3).

A task adapter trains under ``Stack(source_language, task)`` with the
language adapter frozen; evaluation swaps the language adapter per example:

    train:  eng text ─► Stack("eng", "genre") ─► head
    test:   swh text ─► Stack("swh", "genre") ─► head     (eval_mode="own")
            swh text ─► Stack("eng", "genre") ─► head     (eval_mode="source")
            swh text ─► "genre"               ─► head     (eval_mode="none")

Results are kept per language (accuracy, macro-F1; span F1 for BIO tags).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from xlpeft.core.composition import Setup, Stack
from xlpeft.errors import XlpeftValueError
from xlpeft.lightning.base import AdapterModule, mean_pool
from xlpeft.lightning.spans import span_f1

TASKS = ("seq-cls", "token-cls")
EVAL_MODES = ("own", "source", "none")


class TaskAdaptation(AdapterModule):
    """A task adapter plus a small head, over frozen language adapters."""

    def __init__(self, backbone: str = "embedded", labels: Sequence[str] = (), task: str = "seq-cls",
                 task_adapter: str = "task", adapter: str | dict = "pfeiffer",
                 source_language: str = "eng", language_adapters: dict[str, str] | None = None,
                 eval_mode: str = "own", dropout: float = 0.1, lr: float = 1e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 0) -> None:
        super().__init__(backbone, head="base", lr=lr, weight_decay=weight_decay,
                         warmup_steps=warmup_steps)
        self.save_hyperparameters()
        if task not in TASKS:
            raise XlpeftValueError(f"`task` can be {', '.join(TASKS)}; got {task!r}")
        if len(labels) < 2:
            raise XlpeftValueError(f"`labels` needs at least two label names; got {list(labels)}")
        if eval_mode not in EVAL_MODES:
            raise XlpeftValueError(f"`eval_mode` can be {', '.join(EVAL_MODES)}; got {eval_mode!r}")
        self.labels = list(labels)
        self.task = task
        self.task_adapter = task_adapter
        self.source_language = source_language
        self.eval_mode = eval_mode
        for lang, path in (language_adapters or {}).items():
            self.adapted.load_adapter(path, name=lang)
        self.adapted.add_adapter(task_adapter, adapter)
        self.adapted.train_adapters(task_adapter)
        hidden = self.adapted.backbone.hidden
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, len(self.labels)))
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.eval_setups: dict[str, Setup] = {}
        """Per-language evaluation setups that win over ``eval_mode`` (set by TestTimeAdaptation)."""

    # --------------------------------------------------------------- routing
    def language_setup(self, lang: str, training: bool) -> Setup:
        """The setup one example runs under (see the module docstring)."""
        known = self.adapted.configs
        if not training and lang in self.eval_setups:
            return self.eval_setups[lang]
        mode = "source" if training else self.eval_mode
        if mode not in EVAL_MODES:
            raise XlpeftValueError(f"`eval_mode` can be {', '.join(EVAL_MODES)}; got {mode!r}")
        chosen = {"own": lang if lang in known else self.source_language,
                  "source": self.source_language, "none": None}[mode]
        if chosen is None or chosen not in known:
            return self.task_adapter
        return Stack(chosen, self.task_adapter)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        setups = [self.language_setup(lang, self.training) for lang in batch["langs"]]
        out = self.adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           adapters=setups)
        hidden = out.last_hidden_state
        if self.task == "seq-cls":
            hidden = mean_pool(hidden, batch["attention_mask"])
        return self.head(hidden)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               batch["labels"].reshape(-1), ignore_index=-100)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["langs"]))
        return loss

    # --------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        preds = self(batch).argmax(-1)
        for i, lang in enumerate(batch["langs"]):
            self._outputs.setdefault(lang, []).append((preds[i].cpu(), batch["labels"][i].cpu()))

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self.results = self._collect()
        for lang, row in self.results.items():
            for key, value in row.items():
                if key != "examples":
                    self.log(f"{self._stage()}/{lang}/{key}", value, sync_dist=True)  # equal on all ranks

    on_test_epoch_end = on_validation_epoch_end

    def _stage(self) -> str:
        return "test" if self._trainer is not None and self.trainer.testing else "val"

    def _gathered(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Every rank's (prediction, gold) pairs, so all ranks score the whole set alike."""
        if self._trainer is None or self.trainer.world_size < 2 or not torch.distributed.is_initialized():
            return self._outputs
        parts: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(parts, self._outputs)
        merged: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for part in parts:
            for lang, pairs in part.items():
                merged.setdefault(lang, []).extend(pairs)
        return merged

    def _collect(self) -> dict[str, dict[str, float]]:
        out = {}
        n = len(self.labels)
        for lang, pairs in sorted(self._gathered().items()):
            if self.task == "seq-cls":
                preds = torch.stack([p for p, _ in pairs])
                gold = torch.stack([g for _, g in pairs])
                out[lang] = {
                    "accuracy": float(multiclass_accuracy(preds, gold, n, average="micro")),
                    "macro_f1": float(multiclass_f1_score(preds, gold, n, average="macro")),
                    "examples": len(pairs),
                }
            else:
                out[lang] = self._token_scores(pairs, n)
        self._outputs = {}
        return out

    def _token_scores(self, pairs: list, n: int) -> dict[str, float]:
        keep = [(p[g != -100], g[g != -100]) for p, g in pairs]
        preds = torch.cat([p for p, _ in keep])
        gold = torch.cat([g for _, g in keep])
        row = {"accuracy": float((preds == gold).float().mean()), "examples": len(pairs)}
        if any(label.startswith("B-") for label in self.labels):
            names = [([self.labels[i] for i in p.tolist()], [self.labels[i] for i in g.tolist()])
                     for p, g in keep]
            row["span_f1"] = span_f1([g for _, g in names], [p for p, _ in names])
        return row
