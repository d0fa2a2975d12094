"""LoKr: a Kronecker-product update of frozen linear layers.

As in LyCORIS and HF PEFT's ``LoKrConfig`` (KronA-style, Edalati et al. 2022,
"KronA: Parameter Efficient Tuning with Kronecker Adapter"): same
factorisation of the sizes, parameter names, initialisation and scale.

    in = m·n, out = l·k  (``factorization``: factors nearest √dim, or ``decompose_factor``)
    ΔW = (W1 ⊗ W2) · α/r      W1 ∈ ℝ^{l×m},  W2 ∈ ℝ^{k×n}

    W2 = W2a·W2b (rank r) unless r ≥ max(k, n)/2, then a full matrix;
    W1 = W1a·W1b likewise only with ``decompose_both``.

    x ─► W ─► y ─► y + ΔW·x

``W1`` starts at zero, so a new adapter is the identity; ``merge`` folds ΔW
into W. Not implemented from PEFT: ``rank_dropout``, ``module_dropout``,
``init_weights="lycoris"`` and the Tucker (``use_effective_conv2d``) form,
which is for convolutions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.errors import XlpeftValueError
from xlpeft.methods._targets import LinearTargetsConfig, check_rank
from xlpeft.methods.base import Dims, Site, check_positive, register_method


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m·n = dimension``: LyCORIS's rule (``m = factor`` when it divides, else ``m ≤ n``)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor  # as LyCORIS: not reordered
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


@register_method
@dataclass(frozen=True)
class LoKrConfig(LinearTargetsConfig):
    """Kronecker-product updates of the linears named by ``targets`` or ``target_patterns``."""

    method = "lokr"
    r: int = 8
    """Rank of the factorised Kronecker factor(s)."""
    alpha: float = 8
    """Scale numerator: ΔW is multiplied by ``alpha / r`` (PEFT's default 8)."""
    decompose_both: bool = False
    """Also write the left factor ``W1`` as a rank-``r`` product."""
    decompose_factor: int = -1
    """Size of the first factor of each dimension when it divides it; -1: near the square root."""
    init_zero: bool = True
    """Zero ``W1`` (or ``W1a``) so a new adapter is the identity; else every factor is random."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("r", self.r)
        check_positive("alpha", self.alpha)
        if self.decompose_factor != -1 and self.decompose_factor < 1:
            raise XlpeftValueError(f"`decompose_factor` can be -1 (near the square root) or a positive "
                                   f"integer; got {self.decompose_factor!r}")

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        check_rank("r", self.r, dims)
        return LoKr(dims.in_features, dims.out_features, self)


class LoKr(nn.Module):
    """One Kronecker-product update of one linear layer (PEFT's parameter names)."""

    has_input_transform = False
    mergeable = True

    def __init__(self, n_in: int, n_out: int, config: LoKrConfig) -> None:
        super().__init__()
        r = config.r
        in_m, in_n = factorization(n_in, config.decompose_factor)
        out_l, out_k = factorization(n_out, config.decompose_factor)
        self.full_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
        self.full_w2 = not r < max(out_k, in_n) / 2
        init = (lambda p: nn.init.kaiming_uniform_(p, a=math.sqrt(5)))
        if self.full_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
            (nn.init.zeros_ if config.init_zero else init)(self.lokr_w1)
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_l, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, in_m))
            (nn.init.zeros_ if config.init_zero else init)(self.lokr_w1_a)
            init(self.lokr_w1_b)
        if self.full_w2:
            self.lokr_w2 = nn.Parameter(init(torch.empty(out_k, in_n)))
        else:
            self.lokr_w2_a = nn.Parameter(init(torch.empty(out_k, r)))
            self.lokr_w2_b = nn.Parameter(init(torch.empty(r, in_n)))
        self.scaling = config.alpha / r

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W1, W2)`` as full matrices."""
        w1 = self.lokr_w1 if self.full_w1 else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if self.full_w2 else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.factors()
        return y + F.linear(x, (torch.kron(w1, w2) * self.scaling).to(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        """``(W1 ⊗ W2)·α/r`` in float32."""
        w1, w2 = self.factors()
        return torch.kron(w1.float(), w2.float()) * self.scaling

    @torch.no_grad()
    def merge(self, linear: nn.Linear) -> None:
        """``W ← W + ΔW``, summed in float32 and rounded once to W's dtype."""
        delta = self.delta_weight().to(linear.weight.device)
        linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
