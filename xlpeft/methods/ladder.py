"""Ladder Side-Tuning: a small side network on the frozen backbone's hidden states.

Sung et al. 2022, "LST: Ladder Side-Tuning for Parameter and Memory
Efficient Transfer Learning" (arXiv:2206.06522).

    backbone (frozen, run under no_grad):  h₀ ─► block 1 ─► h₁ ─► … ─► h_n
                                            │ down₀      │ down₁         │ down_n   (d → d/r)
    side network (trains):                 s₀ ─► z₁ = μ₁·down₁(h₁) + (1−μ₁)·s₀ ─► side block ─► s₁ ─► … ─► s_n
    output:                                h_n + up(s_n)           μᵢ = σ(αᵢ / T), up starts at 0

Nothing the backbone computes needs a gradient, so its activations are not
kept for backward: training memory is the side network's (see
``scripts/bench_methods.py``). A side block is a pre-norm transformer layer
of width ``d/r``. Departures from the paper: the side blocks start at random
(the paper initialises them from a pruned backbone) and the output is added to
``h_n`` (up-projection zero-initialised, so training starts at the backbone's
output) rather than replacing it.

It is a separate module around the backbone, not an adapter at points: it
cannot be attached with ``add_adapter``, cannot be routed per example and has
nothing to merge (``add_adapter`` says so). Save and load its
``state_dict`` (``LadderSideTuning.side``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xlpeft.errors import XlpeftValueError
from xlpeft.methods._targets import check_dropout
from xlpeft.methods.base import (
    AdapterConfig, Dims, Site, bottleneck_width, check_positive, check_range, register_method,
)


@register_method
@dataclass(frozen=True)
class LadderConfig(AdapterConfig):
    """A side network of width ``hidden / reduction_factor`` with one gated rung per block."""

    method = "ladder"
    reduction_factor: float = 8
    """Hidden size / side width (the paper uses 8)."""
    heads: int = 4
    """Attention heads of each side block (must divide the side width)."""
    gate_temperature: float = 0.1
    """``T`` of the gates ``μᵢ = σ(αᵢ / T)`` (the paper's 0.1)."""
    dropout: float = 0.0
    """Dropout inside the side blocks."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("reduction_factor", self.reduction_factor)
        check_range("heads", self.heads, 1, 1024, "(attention heads per side block)")
        check_positive("gate_temperature", self.gate_temperature)
        check_dropout(self.dropout)

    def sites(self) -> list[Site]:
        raise XlpeftValueError(
            "ladder side-tuning is a side network around the frozen backbone, not an adapter at its points: "
            "it cannot be added with add_adapter, routed per example or merged. Wrap the backbone instead: "
            "LadderSideTuning(model.base_model, LadderConfig(...))")

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        raise XlpeftValueError("ladder side-tuning has no per-point modules; use LadderSideTuning")


class LadderSideNetwork(nn.Module):
    """The side network: gated rungs from ``num_layers + 1`` hidden states to one ``[B, L, hidden]`` output."""

    def __init__(self, hidden: int, num_layers: int, config: LadderConfig) -> None:
        super().__init__()
        width = bottleneck_width(hidden, config.reduction_factor)
        if width % config.heads:
            raise XlpeftValueError(f"`heads` must divide the side width {width} (hidden {hidden} / "
                                   f"reduction_factor {config.reduction_factor:g}); got {config.heads}")
        check_range("num_layers", num_layers, 1, 4096, "(backbone blocks)")
        self.downs = nn.ModuleList(nn.Linear(hidden, width) for _ in range(num_layers + 1))
        self.gates = nn.Parameter(torch.zeros(num_layers))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, config.heads, 4 * width, config.dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(num_layers))
        self.up = nn.Linear(width, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.temperature = config.gate_temperature

    def forward(self, hidden_states: Sequence[torch.Tensor],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if len(hidden_states) != len(self.downs):
            raise XlpeftValueError(f"the side network reads {len(self.downs)} hidden states (embeddings + "
                                   f"{len(self.blocks)} blocks); got {len(hidden_states)}")
        padding = None if attention_mask is None else attention_mask == 0
        states = [h.detach() for h in hidden_states]  # no gradient into the backbone, ever
        dtype = self.up.weight.dtype
        side = self.downs[0](states[0].to(dtype))
        for i, block in enumerate(self.blocks):
            mu = torch.sigmoid(self.gates[i] / self.temperature)
            side = block(mu * self.downs[i + 1](states[i + 1].to(dtype)) + (1 - mu) * side,
                         src_key_padding_mask=padding)
        return states[-1] + self.up(side).to(states[-1].dtype)


class LadderSideTuning(nn.Module):
    """A frozen encoder run under ``no_grad``, plus its side network.

    ``backbone``: an HF encoder (a BERT-like base model, ``T5EncoderModel`` …) that
    returns ``hidden_states`` (embeddings + one per block) for ``output_hidden_states=True``.
    """

    def __init__(self, backbone: nn.Module, config: LadderConfig | None = None) -> None:
        super().__init__()
        self.config = config or LadderConfig()
        cfg = backbone.config
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model")
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers")
        self.backbone = backbone.requires_grad_(False)
        self.side = LadderSideNetwork(hidden, layers, self.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        """The side-tuned last hidden state ``[B, L, hidden]``."""
        with torch.no_grad():
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                output_hidden_states=True, **kwargs)
        return self.side(out.hidden_states, attention_mask)


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``states`` over real tokens (a pooled sentence vector for a task head)."""
    if attention_mask is None:
        return states.mean(1)
    mask = attention_mask.to(states.dtype).unsqueeze(-1)
    return (states * mask).sum(1) / mask.sum(1).clamp_min(1)


__all__ = ["LadderConfig", "LadderSideNetwork", "LadderSideTuning", "mean_pool"]
