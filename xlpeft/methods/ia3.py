"""(IA)3: learned rescaling of keys, values and FFN activations.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning".

    k, v:      x ─► W ─► y ─► l ⊙ y
    FFN down:  x ─► l ⊙ x ─► W ─► y      (scales the intermediate activation)

Vectors start at one (identity); ``merge`` scales W's rows or columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xlpeft.errors import XlpeftValueError
from xlpeft.methods.base import AdapterConfig, Dims, Site, register_method


@register_method
@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """Per-feature scaling vectors on the linears named by ``targets``."""

    method = "ia3"
    targets: tuple[str, ...] = ("k", "v", "ffn_down")
    """Layout roles to rescale."""
    input_scaled: tuple[str, ...] = ("ffn_down",)
    """Roles whose *input* is scaled (the FFN activation) instead of the output."""
    init_ones: bool = True
    """Start at one so a new adapter is the identity."""
    leave_out: tuple[int, ...] = ()
    """Block indices to skip."""
    stacks: tuple[str, ...] = ("encoder", "decoder")
    """Stacks to adapt in encoder-decoder models."""

    def __post_init__(self) -> None:
        super().__post_init__()
        extra = set(self.input_scaled) - set(self.targets)
        if extra:
            raise XlpeftValueError(
                f"`input_scaled` can only name roles in `targets` {self.targets}; got {sorted(extra)}"
            )

    def sites(self) -> list[Site]:
        return [Site("linear", t, self.stacks, self.leave_out) for t in self.targets]

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        on_input = site.role in self.input_scaled
        return IA3(dims.in_features if on_input else dims.out_features, on_input, self.init_ones)


MIN_SCALE = 1e-6
"""Smallest |scale| a merge accepts: unmerge divides by it."""


class IA3(nn.Module):
    """One scaling vector, on a linear layer's input or output."""

    mergeable = True

    def __init__(self, size: int, on_input: bool, init_ones: bool) -> None:
        super().__init__()
        init = torch.ones(size) if init_ones else torch.empty(size).uniform_(0.5, 1.5)
        self.ia3_l = nn.Parameter(init)
        self.has_input_transform = on_input

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_l.to(x.dtype)  # not a forward: no boundary casts, so keep x's dtype

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if self.has_input_transform else y * self.ia3_l

    def check_merge(self) -> None:
        """Refuse a scale that cannot be divided out again (before anything is merged)."""
        low = float(self.ia3_l.detach().abs().min()) if self.ia3_l.numel() else 1.0
        if low < MIN_SCALE:
            raise XlpeftValueError(
                f"an (IA)3 scale can be merged when every |l| ≥ {MIN_SCALE:g}; got min |l| = {low:.3g}: "
                "unmerge could not divide it out. Use the adapter unmerged"
            )

    @torch.no_grad()
    def merge(self, linear: nn.Linear) -> None:
        """Scale W's columns (input) or rows and bias (output), in float32."""
        self._scale(linear, self.ia3_l.float())

    @torch.no_grad()
    def unmerge(self, linear: nn.Linear) -> None:
        self.check_merge()
        self._scale(linear, 1.0 / self.ia3_l.float())

    def _scale(self, linear: nn.Linear, factor: torch.Tensor) -> None:
        factor = factor.to(linear.weight.device)
        w = linear.weight
        w.copy_((w.float() * (factor[None, :] if self.has_input_transform else factor[:, None])).to(w.dtype))
        if not self.has_input_transform and linear.bias is not None:
            linear.bias.copy_((linear.bias.float() * factor).to(linear.bias.dtype))
