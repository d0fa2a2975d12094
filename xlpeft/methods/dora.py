"""DoRA: LoRA on the direction of a weight, with a learned magnitude per output.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"; computed as HF
PEFT does (``LoraConfig(use_dora=True)``), so equal weights give equal outputs.

    W' = m · (W + s·BA) / ‖W + s·BA‖_c        s = α/r,  ‖·‖_c: norm of each output row

    x ─► W ─► y ─► y + (m/‖W+sBA‖ − 1)·(y − bias) + (m/‖W+sBA‖)·s·B(A(x))

``B`` starts at zero and ``m`` at ‖W‖, so a new adapter is the identity. The
norm is detached (the paper's §4.3 memory saving, as PEFT does). DoRA reads
the frozen weight: its linear point binds it (``bind(linear)``) when the
module is attached; the norm is taken of the linear's *current* weight, so
adapters merged into it earlier count as backbone. It rescales whatever
output reaches it, so it equals its merged form when it is the first
unmerged adapter of its linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.errors import XlpeftValueError
from xlpeft.methods._layers import MaskedLinear
from xlpeft.methods._targets import LinearTargetsConfig, check_dropout, check_rank
from xlpeft.methods.base import Dims, Site, check_positive, register_method


@register_method
@dataclass(frozen=True)
class DoRAConfig(LinearTargetsConfig):
    """Weight-decomposed rank-``r`` updates of the linears named by ``targets`` or ``target_patterns``."""

    method = "dora"
    r: int = 8
    """Rank of the directional update."""
    alpha: float = 16
    """Scale numerator: ``BA`` is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the low-rank input branch (training only)."""
    init_zero_b: bool = True
    """Zero ``B`` so a new adapter is the identity."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("r", self.r)
        check_positive("alpha", self.alpha)
        check_dropout(self.dropout)

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        check_rank("r", self.r, dims)
        return DoRA(dims.in_features, dims.out_features, self)


class DoRA(nn.Module):
    """One weight-decomposed low-rank update of one linear layer."""

    has_input_transform = False
    mergeable = True

    def __init__(self, n_in: int, n_out: int, config: DoRAConfig) -> None:
        super().__init__()
        self.lora_A = MaskedLinear(n_in, config.r, bias=False)
        self.lora_B = MaskedLinear(config.r, n_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if config.init_zero_b:
            nn.init.zeros_(self.lora_B.weight)
        self.magnitude = nn.Parameter(torch.ones(n_out))
        self.scaling = config.alpha / config.r
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    # ------------------------------------------------------------------ the frozen weight
    @torch.no_grad()
    def bind(self, linear: nn.Linear) -> None:
        """Keep ``linear`` (a reference, not a child) and set ``m = ‖W + s·BA‖`` (the identity)."""
        object.__setattr__(self, "_linear", linear)
        if not linear.weight.is_meta:  # on meta: set by initialize_adapters once weights exist
            norm = self._norm(linear.weight.float(), self._lora_weight().to(linear.weight.device))
            self.magnitude.copy_(norm.to(self.magnitude.device))

    @property
    def linear(self) -> nn.Linear:
        linear = self.__dict__.get("_linear")
        if linear is None:
            raise XlpeftValueError("a DoRA module reads its linear's frozen weight; it acts once attached "
                                   "to a model (AdaptedModel.add_adapter binds it)")
        return linear

    def _lora_weight(self) -> torch.Tensor:
        return self.lora_B.effective_weight().float() @ self.lora_A.effective_weight().float()

    def _norm(self, weight: torch.Tensor, lora_weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1)

    # ------------------------------------------------------------------ forward and merge
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        weight = linear.weight.to(x.dtype)
        lora_weight = (self.lora_B.effective_weight() @ self.lora_A.effective_weight()).to(x.dtype)
        norm = torch.linalg.norm(weight + self.scaling * lora_weight.detach(), dim=1).detach()
        scale = (self.magnitude.to(x.dtype) / norm).view(1, -1)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = y if linear.bias is None else y - linear.bias.to(y.dtype)
            h = x
        else:  # the base output of the dropped-out input, as PEFT computes it
            h = self.dropout(x)
            base = F.linear(h, weight)
        lora = self.lora_B(self.lora_A(h)) * self.scaling
        return y + (scale - 1) * base + scale * lora

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``m · (W + sBA) / ‖W + sBA‖_c`` in float32 for the weight ``weight``."""
        full = weight.float() + self.scaling * self._lora_weight().to(weight.device)
        norm = torch.linalg.norm(full, dim=1, keepdim=True)
        return self.magnitude.float().to(weight.device).view(-1, 1) * full / norm

    def delta_weight(self) -> torch.Tensor:
        """``W' − W`` in float32 for the bound linear's current weight (unmerged)."""
        weight = self.linear.weight
        return self.merged_weight(weight) - weight.float()

    def check_merge(self) -> None:
        """Refuse a zero-norm output row (``W + sBA`` has one): the direction is undefined there."""
        full = self.linear.weight.float() + self.scaling * self._lora_weight().to(self.linear.weight.device)
        if bool((torch.linalg.norm(full, dim=1) == 0).any()):
            raise XlpeftValueError("a DoRA adapter can be merged when every row of W + sBA is non-zero; "
                                   "got a zero row. Keep it unmerged")

    @torch.no_grad()
    def merge(self, linear: nn.Linear) -> None:
        """``W ← m·(W + sBA)/‖W + sBA‖_c``, computed in float32 and rounded once to W's dtype."""
        linear.weight.copy_(self.merged_weight(linear.weight).to(linear.weight.dtype))
