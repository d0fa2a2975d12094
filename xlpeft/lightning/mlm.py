"""Masked-LM language adaptation (MAD-X step 1) and MLM-head calibration.

Pfeiffer et al. 2020, "MAD-X": a language adapter per language (``madx-language``
preset: Pfeiffer rf 2 + invertible), trained by masked LM with the backbone
frozen. Several languages train in one run: each example is routed to its own
language's adapter, so one batch updates several adapters and an adapter
absent from a batch gets no gradient.

Logits are computed at masked positions only (the output softmax dominates
MLM cost); the head then runs under a per-token route so invertible adapters
are inverted with the right language.

``train="head"`` calibrates an MLM head (transform + output bias; the decoder
stays tied to the frozen input embeddings) with no adapters: the embedded e5
encoder ships without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import SumMetric

from xlpeft.core.composition import Setup
from xlpeft.errors import XlpeftValueError
from xlpeft.lightning.base import AdapterModule, find_head, perplexity

HEAD_PARAMS = (
    "cls.predictions.transform", "cls.predictions.bias", "cls.predictions.decoder.bias",
    "lm_head.dense", "lm_head.layer_norm", "lm_head.bias", "lm_head.decoder.bias",
)
"""Backbone parameters an MLM-head calibration trains (BERT and XLM-R heads)."""


class MaskedLMAdaptation(AdapterModule):
    """Train one language adapter per language by masked LM (or calibrate the head)."""

    def __init__(self, backbone: str = "embedded", languages: Sequence[str] = ("eng",),
                 adapter: str | dict = "madx-language", train: str = "adapters",
                 load_adapters: dict[str, str] | None = None, lr: float = 1e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 0) -> None:
        super().__init__(backbone, head="masked-lm", lr=lr, weight_decay=weight_decay,
                         warmup_steps=warmup_steps)
        self.save_hyperparameters()
        if train not in ("adapters", "head"):
            raise XlpeftValueError(f"`train` can be 'adapters', 'head'; got {train!r}")
        self.languages = list(languages)
        self.mode = train
        for lang, path in (load_adapters or {}).items():
            self.adapted.load_adapter(path, name=lang)
        if train == "adapters":
            for lang in self.languages:
                if lang not in self.adapted.configs:
                    self.adapted.add_adapter(lang, adapter)
            self.adapted.train_adapters(*self.languages)
        else:
            self.adapted.train_adapters(backbone_params=HEAD_PARAMS)
        self.use_adapters = train == "adapters"
        self.head = find_head(self.adapted.model)
        names = sorted(set(self.languages) | set(load_adapters or {}))
        self.sums = nn.ModuleDict({f"{lang}_{k}": SumMetric() for lang in names
                                   for k in ("loss", "correct", "count")})

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.require_ddp_find_unused(routed=self.use_adapters and len(self.languages) > 1)

    # --------------------------------------------------------------- forward
    def setups(self, langs: Sequence[str]) -> list[Setup] | None:
        """Per-example routing: each example to its language's adapter."""
        if not self.use_adapters:
            return None
        missing = sorted({lang for lang in langs if lang not in self.adapted.configs})
        if missing:
            raise XlpeftValueError(
                f"no language adapter for {missing}; adapters: {self.adapted.adapter_names}"
            )
        return list(langs)

    def masked_logits(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at masked positions only, their labels and their example index."""
        setups = self.setups(batch["langs"])
        labels = batch["labels"]
        with self.adapted.routing(setups, batch_size=labels.shape[0]):
            hidden = self.adapted.model.base_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
        where = (labels != -100).nonzero(as_tuple=True)
        per_token = None if setups is None else [setups[i] for i in where[0].tolist()]
        with self.adapted.routing(per_token, batch_size=len(where[0])):
            logits = self.head(hidden[where])
        return logits, labels[where], where[0]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits, targets, _ = self.masked_logits(batch)
        loss = F.cross_entropy(logits.float(), targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["langs"]))
        return loss

    # --------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits, targets, rows = self.masked_logits(batch)
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
        correct = (logits.argmax(-1) == targets).float()
        langs = batch["langs"]
        for lang in sorted(set(langs)):
            keep = torch.tensor([langs[i] == lang for i in rows.tolist()], device=losses.device)
            if f"{lang}_loss" not in self.sums:
                continue
            self.sums[f"{lang}_loss"].update(losses[keep].sum())
            self.sums[f"{lang}_correct"].update(correct[keep].sum())
            self.sums[f"{lang}_count"].update(keep.sum().float())

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self.results = self._collect()
        stage = "test" if self._trainer is not None and self.trainer.testing else "val"
        for lang, row in self.results.items():  # sums are synced, so equal on all ranks
            self.log(f"{stage}/{lang}/loss", row["loss"], sync_dist=True)
            self.log(f"{stage}/{lang}/acc", row["acc"], sync_dist=True)

    on_test_epoch_end = on_validation_epoch_end

    def _collect(self) -> dict[str, dict[str, float]]:
        out = {}
        langs = sorted({k.rsplit("_", 1)[0] for k in self.sums})
        for lang in langs:
            count = float(self.sums[f"{lang}_count"].compute())
            if count:
                loss = float(self.sums[f"{lang}_loss"].compute()) / count
                out[lang] = {"loss": loss, "acc": float(self.sums[f"{lang}_correct"].compute()) / count,
                             "ppl": perplexity(loss), "tokens": int(count)}
        for metric in self.sums.values():
            metric.reset()
        return out
