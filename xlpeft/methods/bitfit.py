"""BitFit: tune only bias terms.

Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models".

    x ─► W ─► y ─► y + δ      (δ starts at zero; merge adds δ to the bias)

Kept as a named bias *delta* rather than unfreezing the backbone's biases, so
BitFit adapters compose, route per example and save like any other adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xlpeft.methods.base import AdapterConfig, Dims, Site, register_method


@register_method
@dataclass(frozen=True)
class BitFitConfig(AdapterConfig):
    """Bias deltas on the linears named by ``targets``."""

    method = "bitfit"
    targets: tuple[str, ...] = ("q", "k", "v", "o", "ffn_up", "ffn_down")
    """Layout roles whose biases are tuned."""
    leave_out: tuple[int, ...] = ()
    """Block indices to skip."""
    stacks: tuple[str, ...] = ("encoder", "decoder")
    """Stacks to adapt in encoder-decoder models."""

    def sites(self) -> list[Site]:
        return [Site("linear", t, self.stacks, self.leave_out) for t in self.targets]

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        return BiasDelta(dims.out_features)


class BiasDelta(nn.Module):
    """An additive bias on one linear layer's output."""

    mergeable = True
    has_input_transform = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.bias

    @torch.no_grad()
    def merge(self, linear: nn.Linear) -> None:
        """``b ← b + δ``; a bias-free linear (T5) gets a bias, owned by its merge stack in core."""
        if linear.bias is None:  # a normal tensor even under inference_mode: it outlives the block
            with torch.inference_mode(False):
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device,
                                                       dtype=linear.weight.dtype), requires_grad=False)
        self._add(linear, 1.0)

    @torch.no_grad()
    def unmerge(self, linear: nn.Linear) -> None:
        """``b ← b − δ``; removing a bias the merge created is the merge stack's job."""
        self._add(linear, -1.0)

    def _add(self, linear: nn.Linear, sign: float) -> None:
        """``b ← b ± δ`` in float32, rounded once to the bias's dtype."""
        delta = self.bias.detach().float().to(linear.bias.device)
        linear.bias.copy_((linear.bias.float() + sign * delta).to(linear.bias.dtype))
