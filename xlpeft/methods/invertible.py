"""Invertible adapters (MAD-X): a NICE coupling on the token embeddings.

Pfeiffer et al. 2020, "MAD-X: An Adapter-Based Framework for Multi-Task
Cross-Lingual Transfer"; coupling from Dinh et al. 2015, "NICE".

    embeddings ─► [x1|x2] ─► y1 = x1 + F(x2), y2 = x2 + G(y1) ─► encoder
    MLM head transform ─► inverse: x2 = y2 − G(y1), x1 = y1 − F(x2) ─► tied decoder

The inverse before the tied output embeddings lets a language adapter
re-map the input *and* the output vocabulary space of a new language.
F and G end in zero-initialised layers, so a new adapter is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xlpeft.methods._layers import MaskedLinear, activation, zero_
from xlpeft.methods.base import (
    MAX_WIDEN, AdapterConfig, Dims, Site, bottleneck_width, check_positive, check_range, register_method,
)


@register_method
@dataclass(frozen=True)
class InvertibleConfig(AdapterConfig):
    """NICE coupling on the embedding output, inverted before the LM output."""

    method = "invertible"
    reduction_factor: float = 2
    """Width of F and G is ``hidden / 2 / reduction_factor``."""
    non_linearity: str = "relu"
    """Non-linearity inside F and G."""
    init_zero: bool = True
    """Start as the identity (zero last layers of F and G)."""
    stacks: tuple[str, ...] = ("encoder",)
    """Stacks whose input embeddings are transformed."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("reduction_factor", self.reduction_factor)
        check_range("reduction_factor", self.reduction_factor, 1 / MAX_WIDEN, float("inf"),
                    f"(F and G at most {MAX_WIDEN}× wider than half the hidden size)")
        activation(self.non_linearity)

    def sites(self) -> list[Site]:
        return [Site("embed", "", self.stacks), Site("lm_output", "", self.stacks)]

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        # One coupling per adapter, owned as shared state; both sites are views.
        if not isinstance(shared, NICECoupling):
            raise RuntimeError("invertible sites need the adapter's shared coupling")
        return InverseView(shared) if site.kind == "lm_output" else ForwardView(shared)

    def build_shared(self, dims: Dims) -> nn.Module:
        return NICECoupling(dims.hidden, self)


def _mlp(n_in: int, n_out: int, width: int, act: str, zero_last: bool) -> nn.Sequential:
    last = MaskedLinear(width, n_out)
    if zero_last:
        zero_(last)
    return nn.Sequential(MaskedLinear(n_in, width), activation(act), last)


class NICECoupling(nn.Module):
    """Additive coupling: exactly invertible whatever F and G are."""

    def __init__(self, hidden: int, config: InvertibleConfig) -> None:
        super().__init__()
        self.half = hidden // 2
        rest = hidden - self.half
        width = bottleneck_width(max(1, self.half), config.reduction_factor)
        self.F = _mlp(rest, self.half, width, config.non_linearity, config.init_zero)
        self.G = _mlp(self.half, rest, width, config.non_linearity, config.init_zero)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x1, x2 = h[..., : self.half], h[..., self.half:]
        y1 = x1 + self.F(x2)
        return torch.cat([y1, x2 + self.G(y1)], dim=-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y[..., : self.half], y[..., self.half:]
        x2 = y2 - self.G(y1)
        return torch.cat([y1 - self.F(x2), x2], dim=-1)


class ForwardView(nn.Module):
    """The forward of a coupling owned elsewhere (no parameters of its own)."""

    def __init__(self, coupling: NICECoupling) -> None:
        super().__init__()
        object.__setattr__(self, "coupling", coupling)  # a reference, not a child

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.coupling(h)


class InverseView(nn.Module):
    """The inverse of a coupling owned elsewhere (no parameters of its own)."""

    def __init__(self, coupling: NICECoupling) -> None:
        super().__init__()
        object.__setattr__(self, "coupling", coupling)  # a reference, not a child

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.coupling.inverse(y)
