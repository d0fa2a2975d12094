"""KronA: a Kronecker-product adapter on frozen linear layers.

Edalati et al. 2022, "KronA: Parameter Efficient Tuning with Kronecker
Adapter" (arXiv:2212.10650).

    out = a_out·b_out,  in = a_in·b_in       A ∈ ℝ^{a_out×a_in},  B ∈ ℝ^{b_out×b_in}
    ΔW = s·(A ⊗ B)                           (a_out·a_in + b_out·b_in parameters)

    x ─► W ─► y ─► y + s·vec(A · X · Bᵀ)      X = x reshaped to [a_in, b_in]

The forward never forms ``A ⊗ B``: reshaping ``x`` to ``a_in × b_in`` makes the
Kronecker product two small matmuls (the paper's efficient form). Unlike LoKr
both factors are full (no low-rank split) and ``B`` starts at zero, so a new
adapter is the identity; ``merge`` folds ``s·(A ⊗ B)`` into W. Not done: the
paper's KronA^B / KronA^B_res variants (a Kronecker module parallel to the FFN block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.errors import XlpeftValueError
from xlpeft.methods._targets import LinearTargetsConfig
from xlpeft.methods.base import Dims, Site, check_positive, register_method
from xlpeft.methods.lokr import factorization


@register_method
@dataclass(frozen=True)
class KronAConfig(LinearTargetsConfig):
    """Kronecker-product updates ``s·(A ⊗ B)`` of the linears named by ``targets`` or ``target_patterns``."""

    method = "krona"
    a_out: int = -1
    """Rows of ``A`` (must divide the linear's output size); -1: the factor nearest √out."""
    a_in: int = -1
    """Columns of ``A`` (must divide the linear's input size); -1: the factor nearest √in."""
    scaling: float = 1.0
    """The scale ``s`` of the update."""
    init_zero_b: bool = True
    """Zero ``B`` so a new adapter is the identity (else both factors are random)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("scaling", self.scaling)
        for name in ("a_out", "a_in"):
            value = getattr(self, name)
            if value != -1 and value < 1:
                raise XlpeftValueError(f"`{name}` can be -1 (near the square root) or a positive integer; "
                                       f"got {value!r}")

    def shapes(self, n_in: int, n_out: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((a_out, a_in), (b_out, b_in))`` for an ``n_in → n_out`` linear."""
        a_out = factorization(n_out)[0] if self.a_out == -1 else self.a_out
        a_in = factorization(n_in)[0] if self.a_in == -1 else self.a_in
        for field_name, a, n in (("a_out", a_out, n_out), ("a_in", a_in, n_in)):
            if n % a:
                raise XlpeftValueError(f"`{field_name}` must divide the linear's size {n}; got {a}. Pick a "
                                       f"divisor of {n} or -1")
        return (a_out, a_in), (n_out // a_out, n_in // a_in)

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        return KronA(dims.in_features, dims.out_features, self)


class KronA(nn.Module):
    """One Kronecker adapter ``s·(A ⊗ B)`` of one linear layer."""

    has_input_transform = False
    mergeable = True

    def __init__(self, n_in: int, n_out: int, config: KronAConfig) -> None:
        super().__init__()
        (a_out, a_in), (b_out, b_in) = config.shapes(n_in, n_out)
        self.krona_A = nn.Parameter(torch.empty(a_out, a_in))
        self.krona_B = nn.Parameter(torch.empty(b_out, b_in))
        nn.init.kaiming_uniform_(self.krona_A, a=math.sqrt(5))
        if config.init_zero_b:
            nn.init.zeros_(self.krona_B)
        else:
            nn.init.kaiming_uniform_(self.krona_B, a=math.sqrt(5))
        self.scaling = config.scaling

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = self.krona_A.to(x.dtype), self.krona_B.to(x.dtype)
        # Two plain 2-D matmuls (same kernels whether or not the factors require grad):
        lead, (a_out, a_in), (b_out, b_in) = x.shape[:-1], a.shape, b.shape
        t = F.linear(x.reshape(-1, b_in), b).view(-1, a_in, b_out)             # X·Bᵀ   [N, a_in, b_out]
        t = F.linear(t.transpose(1, 2).reshape(-1, a_in), a).view(-1, b_out, a_out)  # A·X·Bᵀ, transposed
        delta = t.transpose(1, 2).reshape(*lead, a_out * b_out)
        return y + self.scaling * delta

    def delta_weight(self) -> torch.Tensor:
        """``s·(A ⊗ B)`` in float32."""
        return self.scaling * torch.kron(self.krona_A.float(), self.krona_B.float())

    @torch.no_grad()
    def merge(self, linear: nn.Linear) -> None:
        """``W ← W + ΔW``, summed in float32 and rounded once to W's dtype."""
        delta = self.delta_weight().to(linear.weight.device)
        linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
