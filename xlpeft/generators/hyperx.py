"""Hyper-X style hypernetwork: one network for every language, task and layer.

Üstün et al. 2022, "Hyper-X: A Unified Hypernetwork for Multi-Task
Multilingual Transfer" (EMNLP).

    language embedding = MLP(URIEL typology)   (unseen languages get one too)
    task embedding     = learned, per task name ("mlm", "genre" …)
    layer embedding    = learned, per slot (layer × sublayer)
    [lang; task; layer] ─► projector MLP ─► s ─► shared linear head ─► θ (one adapter)

Hyper-X learns a language embedding per training language; here it comes from
typology so a language never seen in training still gets adapter weights.
Trained on task data in some languages plus MLM in others
(``xlpeft.lightning.generator.HyperXTraining``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xlpeft.errors import XlpeftValueError
from xlpeft.generators.base import AdapterGenerator, GeneratorConfig, Weights
from xlpeft.generators.madg import MAX_DIM, check_generator_sizes
from xlpeft.methods.base import bottleneck_width, check_positive, check_range


@dataclass(frozen=True)
class HyperXConfig(GeneratorConfig):
    """A Hyper-X hypernetwork conditioned on language, task and layer."""

    tasks: tuple[str, ...] = ("mlm",)
    """Task names with an embedding; an adapter is generated per (language, task)."""
    task_dim: int = 8
    """Size of a task embedding."""
    layer_dim: int = 8
    """Size of a slot (layer × sublayer) embedding."""
    source_dim: int = 32
    """Width of the projector output the shared head reads."""

    def __post_init__(self) -> None:
        check_generator_sizes(self)
        super().__post_init__()
        for name in ("task_dim", "layer_dim", "source_dim"):
            check_positive(name, getattr(self, name))
            check_range(name, getattr(self, name), 1, MAX_DIM, "(an embedding or projector width)")
        check_range("len(tasks)", len(self.tasks), 1, MAX_DIM, "(task embeddings)")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise XlpeftValueError(f"`tasks` can be distinct task names (at least one); got {list(self.tasks)}")


class HyperXGenerator(AdapterGenerator):
    """Emits every slot's adapter from (language, task, layer) embeddings."""

    kind = "hyperx"

    def __init__(self, config: HyperXConfig, hidden: int, slots: list[str],
                 backbone: dict[str, Any] | None = None) -> None:
        bottleneck_width(hidden, config.reduction_factor)  # before the head of source_dim × (2wh + w + h)
        super().__init__(config, hidden, slots, backbone)
        w, h = self.width, hidden
        self.tasks = list(config.tasks)
        self.task_embedding = nn.Embedding(len(self.tasks), config.task_dim)
        self.layer_embedding = nn.Embedding(len(slots), config.layer_dim)
        n_in = config.language_dim + config.task_dim + config.layer_dim
        self.projector = nn.Sequential(nn.Linear(n_in, config.source_dim), nn.ReLU())
        self.sizes = (w * h, w, h * w, h)
        self.head = nn.Linear(config.source_dim, sum(self.sizes))
        with torch.no_grad():  # up-projection rows start at zero: identity adapters
            self.head.weight[w * h + w:].zero_()
            self.head.bias.zero_()

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise XlpeftValueError(f"`task` can be {', '.join(map(repr, self.tasks))}; got {task!r}. "
                                   "Add it to HyperXConfig.tasks before training")

    def _generate(self, language: str, task: str) -> Weights:
        S, w, h = len(self.slots), self.width, self.hidden
        lam = self.typology(language).expand(S, -1)
        t = self.task_embedding.weight[self.tasks.index(task)].expand(S, -1)
        theta = self.head(self.projector(torch.cat([lam, t, self.layer_embedding.weight], dim=-1)))
        dw, db, uw, ub = theta.split(self.sizes, dim=-1)
        return dw.reshape(S, w, h), db, uw.reshape(S, h, w), ub
