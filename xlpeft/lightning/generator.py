"""Training typology-conditioned adapter generators (MAD-G, Hyper-X).

``GeneratorMLM`` (MAD-G, Ansell et al. 2021): one generated adapter per
training language, all reading one shared generator; a batch mixes
languages (temperature sampling in ``MLMDataModule``), each example routed
to its language's adapter, so one step updates the generator from every
language in the batch. Masked-only logits, as ``MaskedLMAdaptation``.

``HyperXTraining`` (Üstün et al. 2022): the same plus task data; each step
takes an MLM batch (``languages``, task ``mlm``) and a task batch
(``task_languages``, task e.g. ``genre``) and sums both losses. Zero-shot,
``Stack``-free: the generator emits the (language, task) adapter directly.

Both export the generator (``export_generator``) and materialise adapters
for any code lang2vec knows (``AdapterGenerator.materialise``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from torch import nn

from xlpeft.data.datamodules import GenreDataModule, MLMDataModule
from xlpeft.errors import CorruptFileError, XlpeftValueError
from xlpeft.generators.files import build_generator, load_generator, save_generator
from xlpeft.lightning.base import mean_pool
from xlpeft.lightning.mlm import MaskedLMAdaptation, language_sums, trained_rows
from xlpeft.data._common import save_data_hparams


class GeneratorMLM(MaskedLMAdaptation):
    """Train a generator by routed multi-language MLM through its generated adapters.

    Args:
        backbone: "embedded", a Hugging Face model name or a local model folder.
        languages: Training languages (the data may hold more: `eval_languages`).
        generator: "madg" or "hyperx".
        generator_config: Generator fields (reduction_factor, basis, language_dim, ...).
        load_generator_from: A generator directory to start from.
        eval_languages: Held-out languages, evaluated through generated adapters only.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the linear decay.
    """

    generated_adapters = True

    def __init__(self, backbone: str = "embedded", languages: Sequence[str] = ("eng",),
                 generator: Literal["madg", "hyperx"] = "madg", generator_config: dict[str, Any] | None = None,
                 load_generator_from: str | None = None, eval_languages: Sequence[str] = (),
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0) -> None:
        if not languages:
            raise XlpeftValueError("`languages` can be one or more language codes; got none")
        # no static adapters: MaskedLMAdaptation is built with none, generated ones are added here
        super().__init__(backbone, languages=(), lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.save_hyperparameters()
        gen = (load_generator(load_generator_from, self.adapted) if load_generator_from
               else build_generator(generator, self.adapted, **(generator_config or {})))
        self.generator = gen
        self.mlm_task = "mlm" if gen.kind == "hyperx" else ""
        self.languages = [gen.attach(self.adapted, lang, self.mlm_task, name=lang) for lang in languages]
        for lang in eval_languages:  # held-out: generated from typology, never trained on
            if lang not in self.adapted.configs:
                gen.attach(self.adapted, lang, self.mlm_task, name=lang)
        self.adapted.train_adapters(*self.languages)
        names = sorted(set(self.languages) | set(eval_languages))
        self.sums = language_sums(names)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """MLM on the training languages only: an ``eval_languages`` line in the data (there to be
        evaluated) would train the shared generator through its generated adapter, a leak."""
        batch = trained_rows(batch, self.languages)
        return None if batch is None else super().training_step(batch, batch_idx)

    def export_generator(self, path: str | Path) -> Path | None:
        """Write the generator directory (rank zero only)."""
        if getattr(self, "_trainer", None) is not None and not self.trainer.is_global_zero:
            return None
        return save_generator(self.generator, path)

    def on_train_end(self) -> None:
        self.generator.clear_cache()


class HyperXTraining(GeneratorMLM):
    """Hyper-X: MLM in ``languages`` plus a classification task in ``task_languages``.

    Args:
        backbone: "embedded", a Hugging Face model name or a local model folder.
        languages: MLM training languages.
        task_languages: Languages the task trains in.
        labels: Task label names, in the data's id order.
        task: Task name the generator is conditioned on.
        generator_config: Generator fields (reduction_factor, ...).
        load_generator_from: A generator directory to start from.
        task_weight: Weight of the task loss against the MLM loss.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the linear decay.
    """

    def __init__(self, backbone: str = "embedded", languages: Sequence[str] = ("eng",),
                 task_languages: Sequence[str] = ("eng",), labels: Sequence[str] = (),
                 task: str = "genre", generator_config: dict[str, Any] | None = None,
                 load_generator_from: str | None = None, task_weight: float = 1.0,
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0) -> None:
        config = {"tasks": ["mlm", task], **(generator_config or {})}
        super().__init__(backbone, languages, "hyperx", config, load_generator_from, (), lr,
                         weight_decay, warmup_steps)
        self.save_hyperparameters()
        if len(labels) < 2:
            raise XlpeftValueError(f"`labels` needs at least two label names; got {list(labels)}")
        self.task, self.labels, self.task_weight = task, list(labels), task_weight
        self.task_names = {lang: self.generator.attach(self.adapted, lang, task) for lang in task_languages}
        self.adapted.train_adapters(*self.languages, *self.task_names.values())
        self.classifier = nn.Linear(self.adapted.backbone.hidden, len(self.labels))

    def task_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Classify with each example's generated (language, task) adapter."""
        names = [self.task_name(lang) for lang in batch["langs"]]
        with self.adapted.routing(names, batch_size=len(names)):
            out = self.adapted.model.base_model(input_ids=batch["input_ids"],
                                                attention_mask=batch["attention_mask"])
        return self.classifier(mean_pool(out.last_hidden_state, batch["attention_mask"]))

    def task_name(self, lang: str) -> str:
        """The (language, task) adapter, generated on first use for an unseen language."""
        if lang not in self.task_names:
            self.task_names[lang] = self.generator.attach(self.adapted, lang, self.task)
        return self.task_names[lang]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        mlm_batch = trained_rows(batch["mlm"], self.languages)  # held-out languages never train
        if mlm_batch is None:
            mlm = torch.zeros((), device=batch["task"]["labels"].device)
        else:
            logits, targets, _ = self.masked_logits(mlm_batch)
            mlm = F.cross_entropy(logits.float(), targets)
        task = F.cross_entropy(self.task_logits(batch["task"]).float(), batch["task"]["labels"])
        loss = mlm + self.task_weight * task
        self.log_dict({"train/mlm": mlm, "train/task": task}, prog_bar=True, batch_size=len(batch["task"]["langs"]))
        return loss


class MLMAndTaskDataModule(L.LightningDataModule):
    """MLM batches in some languages zipped with genre batches in others (Hyper-X training).

    Args:
        languages: MLM languages (embedded corpora).
        task_language: Language of the genre task's training verses.
        eval_languages: Languages the genre task is evaluated in.
        backbone: Model whose tokenizer is used; under `xlpeft fit` it follows the model's.
        max_length: Tokens per example.
        batch_size: Examples per batch (each of MLM and task).
        max_train_lines: MLM training lines per language (null = all).
        max_per_genre: Genre training verses per genre (null = all).
        temperature: MLM language sampling p ~ n ** (1/T).
        seed: Seed of the samplers.
    """

    def __init__(self, languages: Sequence[str] = ("eng",), task_language: str = "eng",
                 eval_languages: Sequence[str] = ("eng",), backbone: str = "embedded",
                 max_length: int = 64, batch_size: int = 16, max_train_lines: int | None = 2000,
                 max_per_genre: int | None = 200, temperature: float = 5.0, seed: int = 0) -> None:
        init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        save_data_hparams(self, init_args)
        self.mlm = MLMDataModule(languages, backbone, max_length=max_length, batch_size=batch_size,
                                 max_train_lines=max_train_lines, temperature=temperature, seed=seed)
        self.task = GenreDataModule(task_language, eval_languages, backbone, max_length=max_length,
                                    batch_size=batch_size, max_per_genre=max_per_genre, seed=seed)

    def _inner(self) -> dict[str, L.LightningDataModule]:
        """The two inner DataModules, following this one's trainer (their positions read it)."""
        for data in (self.mlm, self.task):
            data.trainer = self.trainer
        return {"mlm": self.mlm, "task": self.task}

    def setup(self, stage: str | None = None) -> None:
        for data in self._inner().values():
            data.setup(stage)

    def state_dict(self) -> dict[str, Any]:
        """Both inner positions (batches trained x batch size; the shorter loader cycles within an epoch)."""
        return {key: data.state_dict() for key, data in self._inner().items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or not {"mlm", "task"} <= state_dict.keys():
            raise CorruptFileError(f"the checkpoint's data position can be {{'mlm': ..., 'task': ...}}; got "
                                   f"{state_dict!r}. Was it written by another DataModule?")
        for key, data in self._inner().items():
            data.load_state_dict(state_dict[key])

    def train_dataloader(self) -> CombinedLoader:
        # max_size_cycle re-iterates the shorter loader within an epoch: its position may span passes
        loaders = {key: data.train_dataloader() for key, data in self._inner().items()}
        longest = max(len(loader) for loader in loaders.values())
        for loader in loaders.values():
            loader.sampler.cycled = len(loader) < longest
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> Any:
        return self.mlm.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.mlm.test_dataloader()
