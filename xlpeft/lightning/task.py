"""Task adaptation and zero-shot cross-lingual transfer (MAD-X steps 2–3).

A task adapter trains under ``Stack(source_language, task)`` with the
language adapter frozen; evaluation swaps the language adapter per example:

    train:  eng text ─► Stack("eng", "genre") ─► head     (train_mode="source")
            xx text  ─► Stack("xx", "genre")  ─► head     (train_mode="own": several source languages)
                     ─► "genre"               ─► head     (with probability language_dropout)
    test:   swh text ─► Stack("swh", "genre") ─► head     (eval_mode="own")
            swh text ─► Stack("eng", "genre") ─► head     (eval_mode="source")
            swh text ─► "genre"               ─► head     (eval_mode="none")

``language_leave_out=(-1,)`` drops the language adapters from the last block
at task time (MAD-X 2.0, Pfeiffer et al. 2021). Results are kept per language
(accuracy, macro-F1; span F1 for BIO tags) in torchmetrics states updated on
device and synced across ranks (``xlpeft.lightning.metrics``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.core.composition import Setup, Stack
from xlpeft.errors import XlpeftKeyError, XlpeftValueError
from xlpeft.methods.base import ConfigUnion
from xlpeft.lightning.base import AdapterModule, mean_pool
from xlpeft.lightning.metrics import Confusion, PerKey, SpanF1, Sums, group_rows

# Literal choices: the CLI refuses another value while parsing, before the backbone loads
TaskKind = Literal["seq-cls", "token-cls"]
EvalMode = Literal["own", "source", "none"]
TrainMode = Literal["source", "own"]
TASKS, EVAL_MODES, TRAIN_MODES = get_args(TaskKind), get_args(EvalMode), get_args(TrainMode)


class TaskAdaptation(AdapterModule):
    """A task adapter plus a small head, over frozen language adapters."""

    def __init__(self, backbone: str = "embedded", labels: Sequence[str] = (), task: TaskKind = "seq-cls",
                 task_adapter: str = "task", adapter: str | dict = "pfeiffer",
                 source_language: str = "eng", language_adapters: dict[str, str] | None = None,
                 eval_mode: EvalMode = "own", dropout: float = 0.1, lr: float = 1e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 0, train_mode: TrainMode = "source",
                 language_dropout: float = 0.0, language_leave_out: Sequence[int] = ()) -> None:
        """A task adapter (and head) trained over frozen language adapters.

        Args:
            backbone: "embedded", a Hugging Face model name or a local model folder.
            labels: Label names, in the order of the data's label ids.
            task: "seq-cls" (one label per text) or "token-cls" (one label per word).
            task_adapter: Name of the task adapter (e.g. genre).
            adapter: Preset name or config dict of the task adapter.
            source_language: Language the task is trained in.
            language_adapters: Language code -> trained language-adapter folder (loaded frozen).
            eval_mode: "own" (each language under its own adapter), "source" (all under the
                source language's adapter) or "none" (the task adapter alone).
            dropout: Dropout before the classification head.
            lr: Peak learning rate of AdamW.
            weight_decay: AdamW weight decay.
            warmup_steps: Linear warm-up steps before the linear decay.
            train_mode: "source" (every example under the source adapter) or "own" (each
                training example under its own language's adapter: several source languages).
            language_dropout: Probability that a training example runs the task adapter alone.
            language_leave_out: Blocks whose language adapters are dropped at task time
                (MAD-X 2.0: [-1]).
        """
        if task not in TASKS:
            raise XlpeftValueError(f"`task` can be {', '.join(TASKS)}; got {task!r}")
        if len(labels) < 2:
            raise XlpeftValueError(f"`labels` needs at least two label names; got {list(labels)}")
        if eval_mode not in EVAL_MODES:
            raise XlpeftValueError(f"`eval_mode` can be {', '.join(EVAL_MODES)}; got {eval_mode!r}")
        if train_mode not in TRAIN_MODES:
            raise XlpeftValueError(f"`train_mode` can be {', '.join(TRAIN_MODES)}; got {train_mode!r}")
        if not 0.0 <= language_dropout < 1.0:
            raise XlpeftValueError(f"`language_dropout` can be a probability in [0, 1); got {language_dropout!r}")
        super().__init__(backbone, head="base", lr=lr, weight_decay=weight_decay,
                         warmup_steps=warmup_steps)
        self.save_hyperparameters()
        self.labels = list(labels)
        self.task = task
        self.task_adapter = task_adapter
        self.source_language = source_language
        self.eval_mode = eval_mode
        self.train_mode = train_mode
        self.language_dropout = float(language_dropout)
        for lang, path in (language_adapters or {}).items():
            self.load_language_adapter(lang, path, tuple(language_leave_out))
        self.adapted.add_adapter(task_adapter, adapter)
        self.adapted.train_adapters(task_adapter)
        hidden = self.adapted.backbone.hidden
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, len(self.labels)))
        self.scores = PerKey(self._metrics)
        self.results: dict[str, dict[str, float]] = {}
        self.eval_setups: dict[str, Setup] = {}
        """Per-language evaluation setups that win over ``eval_mode`` (set by TestTimeAdaptation)."""

    def load_language_adapter(self, lang: str, path: str, leave_out: tuple[int, ...] = ()) -> None:
        """Load a (frozen) language adapter; without its modules in blocks ``leave_out``."""
        self.adapted.load_adapter(path, name=lang)
        if not leave_out:
            return
        try:
            config = self.adapted.configs[lang]
            tensors = {k: v.detach().clone() for k, v in self.adapted.adapter_state_dict(lang).items()}
            kept = without_blocks(config, leave_out)
            self.adapted.delete_adapter(lang)
            self.adapted.add_adapter(lang, kept)
            self.adapted.load_adapter_state_dict(
                lang, {k: tensors[k] for k in self.adapted.adapter_state_dict(lang)})
        except BaseException:
            if lang in self.adapted.configs:
                self.adapted.delete_adapter(lang)
            raise

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        given = getattr(datamodule, "labels", None) if datamodule is not None else None
        if given is not None and list(given) != self.labels:
            raise XlpeftValueError(
                f"the data's labels {list(given)} differ from the model's {self.labels} (order gives the label "
                "ids); give the same list in the same order to both (under `xlpeft fit`, set `labels` once, on "
                "either side, and it is copied to the other)")

    # --------------------------------------------------------------- routing
    def language_adapter_names(self) -> list[str]:
        """Every loaded adapter but the task adapter, sorted (the language adapters)."""
        return sorted(n for n in self.adapted.configs if n != self.task_adapter)

    def has_language_adapters(self) -> bool:
        return bool(self.language_adapter_names())

    def language_setup(self, lang: str, training: bool) -> Setup:
        """The setup one example runs under (see the module docstring)."""
        known = self.adapted.configs
        if not training and lang in self.eval_setups:
            return self.eval_setups[lang]
        mode = self.train_mode if training else self.eval_mode
        if mode not in (*EVAL_MODES, *TRAIN_MODES):
            raise XlpeftValueError(f"`eval_mode` can be {', '.join(EVAL_MODES)}; got {mode!r}")
        if mode == "own" and lang not in known and self.has_language_adapters():
            languages = self.language_adapter_names()
            raise XlpeftKeyError(
                f"{'training' if training else 'eval'}_mode='own' needs a language adapter for {lang!r}; "
                f"loaded: {', '.join(languages)}. Load it (`language_adapters`), set `eval_setups[{lang!r}]`, "
                "or use eval_mode='source' / 'none'")
        chosen = {"own": lang, "source": self.source_language, "none": None}[mode]
        if chosen is None or chosen not in known:
            return self.task_adapter
        return Stack(chosen, self.task_adapter)

    def setups(self, langs: Sequence[str], training: bool) -> list[Setup]:
        """One setup per example; in training, language-adapter dropout applies."""
        setups = [self.language_setup(lang, training) for lang in langs]
        if training and self.language_dropout > 0:
            drop = (torch.rand(len(setups)) < self.language_dropout).tolist()  # host RNG: no device read
            setups = [self.task_adapter if d else s for s, d in zip(setups, drop)]
        return setups

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        setups = self.setups(batch["langs"], self.training)
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
    def _metrics(self) -> dict[str, nn.Module]:
        n = len(self.labels)
        out: dict[str, nn.Module] = {"confusion": Confusion(n), "examples": Sums(1)}
        if self.task == "token-cls" and any(label.startswith("B-") for label in self.labels):
            out["spans"] = SpanF1(self.labels)
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        preds = self(batch).argmax(-1)
        labels = batch["labels"]
        for lang, rows in group_rows(batch["langs"], preds.device):
            p, g = (preds, labels) if rows is None else (preds.index_select(0, rows), labels.index_select(0, rows))
            metrics = self.scores[lang]
            metrics["confusion"].update(p, g)
            metrics["examples"].update(torch.ones(1, device=preds.device) * g.shape[0])
            if "spans" in metrics:
                metrics["spans"].update(p, g)

    test_step = validation_step

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per-example predictions: ``preds`` (label ids; per token for token-cls, -100 where
        ``labels`` is -100), ``logits``, ``langs``, ``label_names`` and gold ``labels`` if given."""
        logits = self(batch)
        preds = logits.argmax(-1)
        out = {"preds": preds, "logits": logits, "langs": list(batch["langs"]), "label_names": self.labels}
        if "labels" in batch:
            out["labels"] = batch["labels"]
            if self.task == "token-cls":
                out["preds"] = torch.where(batch["labels"] == -100, torch.full_like(preds, -100), preds)
        return out

    def on_validation_epoch_end(self) -> None:
        self.results = self._collect()
        for lang, row in self.results.items():  # synced states: equal on all ranks
            for key, value in row.items():
                if key != "examples":
                    self.log(f"{self._stage()}/{lang}/{key}", value)

    on_test_epoch_end = on_validation_epoch_end

    def _stage(self) -> str:
        return "test" if self._trainer is not None and self.trainer.testing else "val"

    def _collect(self) -> dict[str, dict[str, float]]:
        out = {}
        for lang, values in self.scores.compute().items():
            confusion, examples = values["confusion"], int(values["examples"].sum())
            if not examples:
                continue
            row: dict[str, Any] = {"accuracy": float(confusion["accuracy"]), "examples": examples}
            if self.task == "seq-cls":
                row["macro_f1"] = float(confusion["macro_f1"])
            if "spans" in values:
                row["span_f1"] = float(values["spans"])
            out[lang] = row
        return out


def without_blocks(config: Any, leave_out: tuple[int, ...]) -> Any:
    """``config`` with blocks ``leave_out`` added to its (and its union members') ``leave_out``."""
    if isinstance(config, ConfigUnion):
        return dataclasses.replace(config, configs=tuple(without_blocks(c, leave_out) for c in config.configs))
    if not any(f.name == "leave_out" for f in dataclasses.fields(config)):
        return config  # e.g. an invertible embedding adapter: not in blocks
    return dataclasses.replace(config, leave_out=tuple(sorted({*config.leave_out, *leave_out})))
