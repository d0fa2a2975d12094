"""LoRA: low-rank updates of frozen linear layers.

Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models"; the
gated variant follows Mao et al. 2022, "UniPELT".

    x ─► W ─► y ─► y + (α/r)·B(A(dropout(x)))   [· σ(gate(x)) when gated]

``B`` starts at zero (identity adapter); ``merge`` folds ``(α/r)·BA`` into W.
Sub-modules are named ``lora_A``/``lora_B`` like HF PEFT, for interop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from xlpeft.methods._layers import MaskedLinear
from xlpeft.methods._targets import LinearTargetsConfig, check_dropout, check_rank
from xlpeft.methods.base import Dims, Site, check_positive, register_method


@register_method
@dataclass(frozen=True)
class LoRAConfig(LinearTargetsConfig):
    """Rank-``r`` updates of the linears named by ``targets`` or ``target_patterns``."""

    method = "lora"
    r: int = 8
    """Rank of the update."""
    alpha: float = 16
    """Scale numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the LoRA input branch."""
    gated: bool = False
    """Multiply the update by a learned input-dependent gate (UniPELT); not mergeable."""
    init_zero_b: bool = True
    """Zero ``B`` so a new adapter is the identity."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("r", self.r)
        check_positive("alpha", self.alpha)
        check_dropout(self.dropout)

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        check_rank("r", self.r, dims)
        return LoRA(dims.in_features, dims.out_features, self)


class LoRA(nn.Module):
    """One low-rank update of one linear layer."""

    has_input_transform = False

    def __init__(self, n_in: int, n_out: int, config: LoRAConfig) -> None:
        super().__init__()
        self.lora_A = MaskedLinear(n_in, config.r, bias=False)
        self.lora_B = MaskedLinear(config.r, n_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if config.init_zero_b:
            nn.init.zeros_(self.lora_B.weight)
        self.scaling = config.alpha / config.r
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.gate = nn.Linear(n_in, 1) if config.gated else None

    @property
    def mergeable(self) -> bool:
        return self.gate is None

    def delta_weight(self) -> torch.Tensor:
        """``(α/r)·BA`` in float32, the update of the frozen weight (exact enough to merge bf16)."""
        b, a = self.lora_B.effective_weight().float(), self.lora_A.effective_weight().float()
        return self.scaling * (b @ a)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.lora_A(self.dropout(x))
        if self.gate is not None:
            delta = self.lora_B(h) * self.scaling
            return y + delta * torch.sigmoid(self.gate(x))
        # y + s·(h Bᵀ) in one addmm: no separate scale and add passes over the output.
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]),
                          self.lora_B.effective_weight().t(), alpha=self.scaling)
        return out.view_as(y)

    @torch.no_grad()
    def merge(self, linear: nn.Linear) -> None:
        """``W ← W + ΔW``, summed in float32 and rounded once to W's dtype."""
        linear.weight.copy_((linear.weight.float() + self.delta_weight()).to(linear.weight.dtype))

    @torch.no_grad()
    def unmerge(self, linear: nn.Linear) -> None:
        """``W ← W − ΔW`` (``core.merging`` restores low-precision weights from a copy instead)."""
        linear.weight.copy_((linear.weight.float() - self.delta_weight()).to(linear.weight.dtype))
