"""LoHa: a low-rank Hadamard product update of frozen linear layers.

Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for
Communication-Efficient Federated Learning"; as in LyCORIS and HF PEFT's
``LoHaConfig`` (same parameter names, initialisation and scale).

    ΔW = (W1a · W1b) ⊙ (W2a · W2b) · α/r      W·a ∈ ℝ^{out×r}, W·b ∈ ℝ^{r×in}

    x ─► W ─► y ─► y + ΔW·x

With 2r(in + out) parameters ΔW reaches rank r². ``W2b`` starts at zero, so a
new adapter is the identity; ``merge`` folds ΔW into W. Not implemented from
PEFT: ``rank_dropout``, ``module_dropout`` and the Tucker (``use_effective_conv2d``)
form, which is for convolutions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.methods._targets import LinearTargetsConfig, check_rank
from xlpeft.methods.base import Dims, Site, check_positive, register_method


@register_method
@dataclass(frozen=True)
class LoHaConfig(LinearTargetsConfig):
    """Low-rank Hadamard updates of the linears named by ``targets`` or ``target_patterns``."""

    method = "loha"
    r: int = 8
    """Rank of each of the two factors (ΔW has rank up to r²)."""
    alpha: float = 8
    """Scale numerator: ΔW is multiplied by ``alpha / r`` (PEFT's default 8)."""
    init_zero: bool = True
    """Zero ``hada_w2_b`` so a new adapter is the identity; else all four are random."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("r", self.r)
        check_positive("alpha", self.alpha)

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        check_rank("r", self.r, dims)
        return LoHa(dims.in_features, dims.out_features, self)


class LoHa(nn.Module):
    """One Hadamard-product update of one linear layer."""

    has_input_transform = False
    mergeable = True

    def __init__(self, n_in: int, n_out: int, config: LoHaConfig) -> None:
        super().__init__()
        r = config.r
        self.hada_w1_a = nn.Parameter(torch.empty(n_out, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, n_in))
        self.hada_w2_a = nn.Parameter(torch.empty(n_out, r))
        self.hada_w2_b = nn.Parameter(torch.empty(r, n_in))
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        if config.init_zero:
            nn.init.zeros_(self.hada_w2_b)
        self.scaling = config.alpha / r

    def _delta(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + F.linear(x, self._delta().to(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        """ΔW in float32."""
        w1 = self.hada_w1_a.float() @ self.hada_w1_b.float()
        return w1 * (self.hada_w2_a.float() @ self.hada_w2_b.float()) * self.scaling

    @torch.no_grad()
    def merge(self, linear: nn.Linear) -> None:
        """``W ← W + ΔW``, summed in float32 and rounded once to W's dtype."""
        delta = self.delta_weight().to(linear.weight.device)
        linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
