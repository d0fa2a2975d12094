"""Bottleneck adapters: sequential (Houlsby, Pfeiffer) and (scaled) parallel.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP";
Pfeiffer et al. 2021, "AdapterFusion" (FFN-only placement, used by MAD-X);
He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning" (parallel adapters, scaled by s).

    sequential:  x ─► sublayer ─► h ─► h + s·up(f(down(h)))
    parallel:    x ─► sublayer ─► h ─► h + s·up(f(down(x)))

``x`` is the sublayer input and ``h`` its output before the residual add, so
one module serves post-LN (BERT) and pre-LN (T5, mBART) families alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xlpeft.methods._layers import MaskedLinear, activation, zero_
from xlpeft.methods.base import (
    AdapterConfig, Dims, Site, check_choice, check_positive, register_method,
)


@register_method
@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """A down-projection, a non-linearity and an up-projection at sublayer outputs."""

    method = "bottleneck"
    reduction_factor: float = 16
    """Hidden size divided by the bottleneck width (MAD-X language adapters use 2)."""
    non_linearity: str = "relu"
    """``relu``, ``gelu``, ``swish``, ``tanh`` or ``identity``."""
    placement: tuple[str, ...] = ("ffn",)
    """Sublayers to adapt: ``attn``, ``ffn``, ``cross`` (decoder cross-attention)."""
    mode: str = "sequential"
    """``sequential`` reads the sublayer output; ``parallel`` reads its input."""
    scaling: float = 1.0
    """Multiplier ``s`` of the adapter output (scaled parallel adapters use 4)."""
    init_zero_up: bool = True
    """Zero the up-projection so a new adapter is the identity."""
    leave_out: tuple[int, ...] = ()
    """Block indices without adapters; MAD-X 2.0 drops the last one: ``(-1,)``."""
    stacks: tuple[str, ...] = ("encoder", "decoder")
    """Stacks to adapt in encoder-decoder models."""
    gated: bool = False
    """Multiply the output by a learned input-dependent gate (UniPELT)."""

    def __post_init__(self) -> None:
        check_positive("reduction_factor", self.reduction_factor)
        check_choice("mode", self.mode, ("sequential", "parallel"))
        for p in self.placement:
            check_choice("placement", p, ("attn", "ffn", "cross"))
        activation(self.non_linearity)

    def sites(self) -> list[Site]:
        return [Site("sublayer", role, self.stacks, self.leave_out) for role in self.placement]

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        width = max(1, int(dims.hidden // self.reduction_factor))
        return Bottleneck(dims.hidden, width, self)


class Bottleneck(nn.Module):
    """One bottleneck adapter: ``h + s·up(f(down(source)))``."""

    def __init__(self, hidden: int, width: int, config: BottleneckConfig) -> None:
        super().__init__()
        self.down = MaskedLinear(hidden, width)
        self.act = activation(config.non_linearity)
        self.up = MaskedLinear(width, hidden)
        self.parallel = config.mode == "parallel"
        self.scaling = config.scaling
        if config.init_zero_up:
            zero_(self.up)
        self.gate = nn.Linear(hidden, 1) if config.gated else None

    @property
    def needs_input(self) -> bool:
        """Parallel adapters read the sublayer input, captured by a pre-hook."""
        return self.parallel

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        source = x if self.parallel else h
        delta = self.scaling * self.up(self.act(self.down(source)))
        if self.gate is not None:
            delta = delta * torch.sigmoid(self.gate(source))
        return h + delta
