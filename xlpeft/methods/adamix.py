"""AdaMix: a mixture of adaptation modules, routed at random in training, averaged at inference.

Wang et al. 2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient
Model Tuning" (arXiv:2205.12410).

    E experts per place: down/up projections (bottleneck) or A/B factors (LoRA)
    training:   each forward picks one down (A) and one up (B) expert at random (stochastic routing)
    inference:  the experts' weights are averaged (module merging): one adapter of the usual size

    bottleneck: h ─► h + up_j(f(down_i(h)))              (sublayer outputs; not mergeable)
    lora:       y ─► y + (α/r)·B_j·A_i·x                  (linears; inference form merges into W)

The random choice uses torch's global generator (``torch.manual_seed``
reproduces it). ``consistency_loss`` is the paper's regulariser between two
stochastic forwards. Up projections (``B``) start at zero, so a new adapter is
the identity. Trainable parameters: ``E`` times those of one adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.methods._layers import activation
from xlpeft.methods._targets import LinearTargetsConfig, check_rank
from xlpeft.methods.base import (
    Dims, Site, bottleneck_width, check_choice, check_positive, check_range, register_method,
)


@register_method
@dataclass(frozen=True)
class AdaMixConfig(LinearTargetsConfig):
    """``num_experts`` bottleneck adapters (``kind="bottleneck"``) or LoRA factors (``"lora"``) per place.

    ``targets``/``target_patterns`` place the LoRA kind; the bottleneck kind uses ``placement``.
    """

    method = "adamix"
    kind: str = "bottleneck"
    """``bottleneck`` (sublayer outputs, the paper's main form) or ``lora`` (linears, mergeable)."""
    num_experts: int = 4
    """Experts per projection (the paper uses 4)."""
    reduction_factor: float = 16
    """Bottleneck kind: hidden size / bottleneck width."""
    non_linearity: str = "relu"
    """Bottleneck kind: the non-linearity between the projections."""
    placement: tuple[str, ...] = ("ffn",)
    """Bottleneck kind: sublayers to adapt (``attn``, ``ffn``, ``cross``)."""
    r: int = 8
    """LoRA kind: the rank of each expert's factors."""
    alpha: float = 16
    """LoRA kind: the update is scaled by ``alpha / r``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("kind", self.kind, ("bottleneck", "lora"))
        check_range("num_experts", self.num_experts, 1, 64, "(experts per projection)")
        check_positive("reduction_factor", self.reduction_factor)
        check_positive("r", self.r)
        check_positive("alpha", self.alpha)
        for p in self.placement:
            check_choice("placement", p, ("attn", "ffn", "cross"))
        activation(self.non_linearity)

    def sites(self) -> list[Site]:
        if self.kind == "lora":
            return super().sites()
        return [Site("sublayer", role, self.stacks, self.leave_out) for role in self.placement]

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        if self.kind == "lora":
            check_rank("r", self.r, dims)
            return AdaMixLoRA(dims.in_features, dims.out_features, self)
        return AdaMixBottleneck(dims.hidden, bottleneck_width(dims.hidden, self.reduction_factor), self)


def _pick(count: int, training: bool) -> int | None:
    """A random expert in training (None at inference: the average)."""
    return int(torch.randint(count, ())) if training and count > 1 else None


def _expert(weights: torch.Tensor, index: int | None) -> torch.Tensor:
    return weights.mean(0) if index is None else weights[index]


class AdaMixBottleneck(nn.Module):
    """``E`` down and ``E`` up projections at one sublayer output."""

    has_input_transform = False
    post_norm = False
    needs_input = False

    def __init__(self, hidden: int, width: int, config: AdaMixConfig) -> None:
        super().__init__()
        e = config.num_experts
        self.down_weight = nn.Parameter(torch.empty(e, width, hidden))
        self.down_bias = nn.Parameter(torch.zeros(e, width))
        self.up_weight = nn.Parameter(torch.zeros(e, hidden, width))
        self.up_bias = nn.Parameter(torch.zeros(e, hidden))
        for w in self.down_weight:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.act = activation(config.non_linearity)

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        i, j = _pick(len(self.down_weight), self.training), _pick(len(self.up_weight), self.training)
        flat = h.reshape(-1, h.shape[-1])  # 2-D: the same kernels frozen or trained
        down = F.linear(flat, _expert(self.down_weight, i).to(h.dtype), _expert(self.down_bias, i).to(h.dtype))
        up = F.linear(self.act(down), _expert(self.up_weight, j).to(h.dtype), _expert(self.up_bias, j).to(h.dtype))
        return h + up.view_as(h)


class AdaMixLoRA(nn.Module):
    """``E`` LoRA ``A`` and ``E`` LoRA ``B`` factors of one linear; averaged at inference."""

    has_input_transform = False
    mergeable = True

    def __init__(self, n_in: int, n_out: int, config: AdaMixConfig) -> None:
        super().__init__()
        e = config.num_experts
        self.lora_A = nn.Parameter(torch.empty(e, config.r, n_in))
        self.lora_B = nn.Parameter(torch.zeros(e, n_out, config.r))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scaling = config.alpha / config.r

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        i, j = _pick(len(self.lora_A), self.training), _pick(len(self.lora_B), self.training)
        a, b = _expert(self.lora_A, i).to(x.dtype), _expert(self.lora_B, j).to(x.dtype)
        flat = x.reshape(-1, x.shape[-1])  # 2-D: the same kernels frozen or trained
        return y + self.scaling * F.linear(F.linear(flat, a), b).view(*y.shape)

    def delta_weight(self) -> torch.Tensor:
        """The inference update ``(α/r)·mean(B)·mean(A)`` in float32."""
        return self.scaling * (self.lora_B.float().mean(0) @ self.lora_A.float().mean(0))

    @torch.no_grad()
    def merge(self, linear: nn.Linear) -> None:
        """``W ← W + ΔW`` (the averaged experts), summed in float32 and rounded once."""
        delta = self.delta_weight().to(linear.weight.device)
        linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))


def consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between two stochastic forwards' predictions (the paper's regulariser)."""
    log_a, log_b = F.log_softmax(logits_a.float(), -1), F.log_softmax(logits_b.float(), -1)
    return 0.5 * (F.kl_div(log_a, log_b, log_target=True, reduction="batchmean")
                  + F.kl_div(log_b, log_a, log_target=True, reduction="batchmean"))
