"""MAD-G style contextual parameter generation of language adapters.

Ansell et al. 2021, "MAD-G: Multilingual Adapter Generation for Efficient
Cross-Lingual Transfer" (Findings of EMNLP); contextual parameter generation
from Platanios et al. 2018.

    URIEL typology t ─► MLP ─► λ (language embedding, d)
    slot s (layer × sublayer):  c_s = M_s λ            (K coefficients)
                                W_down = Σ_k c_s,k D_k  (D: K shared basis matrices)
                                W_up   = Σ_k c'_s,k U_k  (U zero-initialised)
                                b      = B_s λ

Every weight is linear in λ given the slot, as in MAD-G; the K basis
tensors are shared by all layers (the low-rank part), so the generator is
about the size of one adapter whatever the number of languages. Trained by
MLM over many languages at once (per-example routing, temperature sampling:
``xlpeft.lightning.generator``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xlpeft.generators.base import AdapterGenerator, GeneratorConfig, Weights, init_normal
from xlpeft.methods.base import bottleneck_width, check_field_types, check_positive, check_range

MAX_DIM = 1024
"""Largest language embedding of a generator (URIEL vectors have a few hundred features)."""
MAX_HIDDEN = 4096
"""Largest hidden layer of the typology MLP."""


def check_generator_sizes(config: GeneratorConfig) -> None:
    """Types first (a ``"2"`` is named, not compared), then the sizes every generator shares."""
    check_field_types(config)
    check_positive("language_dim", config.language_dim)
    check_range("language_dim", config.language_dim, 1, MAX_DIM, "(the language embedding)")
    check_positive("typology_hidden", config.typology_hidden)
    check_range("typology_hidden", config.typology_hidden, 1, MAX_HIDDEN, "(the typology MLP's width)")


@dataclass(frozen=True)
class MadGConfig(GeneratorConfig):
    """A MAD-G generator: typology MLP, per-slot mixing, shared basis tensors."""

    basis: int = 16
    """Number K of shared basis matrices per projection (the rank of the generator)."""

    def __post_init__(self) -> None:
        check_generator_sizes(self)
        super().__post_init__()
        check_positive("basis", self.basis)


class MadGGenerator(AdapterGenerator):
    """Emits per-slot bottleneck weights linear in the language embedding."""

    kind = "madg"

    def __init__(self, config: MadGConfig, hidden: int, slots: list[str],
                 backbone: dict[str, Any] | None = None) -> None:
        width = bottleneck_width(hidden, config.reduction_factor)
        most = min(width * hidden, len(slots) * config.language_dim)
        check_range("basis", config.basis, 1, most,
                    f"(the generated down-projections span at most min(width·hidden, slots·language_dim) = "
                    f"min({width}·{hidden}, {len(slots)}·{config.language_dim}) dimensions: more basis "
                    "matrices add parameters, not expressiveness)")
        super().__init__(config, hidden, slots, backbone)
        S, K, d, w, h = len(slots), config.basis, config.language_dim, self.width, hidden
        self.down_basis = init_normal(K, w, h, fan_in=h)
        self.up_basis = nn.Parameter(torch.zeros(K, h, w))  # a new generator emits identity adapters
        self.down_mix = init_normal(S, K, d, fan_in=d)
        self.up_mix = init_normal(S, K, d, fan_in=d)
        self.down_bias = nn.Parameter(torch.zeros(S, w, d))
        self.up_bias = nn.Parameter(torch.zeros(S, h, d))

    def _generate(self, language: str, task: str) -> Weights:
        return self.emit(self.typology(language))

    def emit(self, lam: torch.Tensor) -> Weights:
        """Every slot's weights for the language embedding ``lam`` (shared with the CPG generator)."""
        down = torch.einsum("skd,d->sk", self.down_mix, lam)
        up = torch.einsum("skd,d->sk", self.up_mix, lam)
        return (torch.einsum("sk,kwh->swh", down, self.down_basis),
                torch.einsum("swd,d->sw", self.down_bias, lam),
                torch.einsum("sk,khw->shw", up, self.up_basis),
                torch.einsum("shd,d->sh", self.up_bias, lam))
