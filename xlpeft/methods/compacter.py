"""Compacter: bottleneck adapters whose projections are PHM (Kronecker) layers.

Karimi Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex
Adapter Layers"; PHM layers from Zhang et al. 2021, "Beyond Fully-Connected
Layers with Quaternions". Defaults follow the adapters library's
``CompacterConfig`` (n = 4, reduction factor 32, GELU, attn + ffn, shared
rules, rank-1 factors).

    x ─► sublayer ─► h ─► h + up(f(down(h)))       (like a Houlsby adapter)

    down, up:  W = Σᵢ Aᵢ ⊗ Bᵢ,   Aᵢ ∈ ℝ^{n×n}  (the "rule", one n×n×n tensor
                                               shared by every layer of an adapter)
                                Bᵢ = sᵢ tᵢᵀ   (rank r, per layer)

A d→k projection then costs r·(d + k) + k parameters instead of d·k + k, plus
n³ once per adapter. The up-projection's left factors sᵢ start at zero, so a
new adapter is the identity. Compacter weights are not ``MaskedLinear``:
``sparsify`` does not prune them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.errors import XlpeftValueError
from xlpeft.methods._layers import activation
from xlpeft.methods.base import (
    MAX_WIDEN, AdapterConfig, Dims, Site, check_choice, check_positive, check_range, register_method,
)

MAX_PHM_DIM = 64
"""Largest ``n``: the rule alone is n³ parameters, and the paper uses n ≤ 12."""


@register_method
@dataclass(frozen=True)
class CompacterConfig(AdapterConfig):
    """PHM bottleneck adapters at sublayer outputs (Compacter; Compacter++ with ``placement=("ffn",)``)."""

    method = "compacter"
    phm_dim: int = 4
    """``n``: number of Kronecker summands; must divide the hidden size."""
    reduction_factor: float = 32
    """Hidden size / bottleneck width (the width is rounded down to a multiple of ``n``, ≥ n)."""
    non_linearity: str = "gelu"
    """``relu``, ``gelu``, ``swish``, ``tanh`` or ``identity``."""
    placement: tuple[str, ...] = ("attn", "ffn")
    """Sublayers to adapt: ``attn``, ``ffn``, ``cross``; ``("ffn",)`` is Compacter++."""
    shared_phm_rule: bool = True
    """One rule tensor ``A`` (n×n×n) for every PHM layer of the adapter; else one per layer."""
    factorized_phm_w: bool = True
    """Write each ``Bᵢ`` as ``sᵢ tᵢᵀ`` of rank ``phm_rank``; else ``Bᵢ`` is a full matrix."""
    phm_rank: int = 1
    """Rank of the factorised ``Bᵢ``."""
    phm_init_range: float = 1e-4
    """Std of the normal init of the rule ``A`` (the adapters library's default)."""
    init_zero_up: bool = True
    """Zero the up-projection's ``sᵢ`` (or ``Bᵢ``) and bias so a new adapter is the identity."""
    leave_out: tuple[int, ...] = ()
    """Block indices without adapters (negative counts from the end)."""
    stacks: tuple[str, ...] = ("encoder", "decoder")
    """Stacks to adapt in encoder-decoder models."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("phm_dim", self.phm_dim)
        check_range("phm_dim", self.phm_dim, 1, MAX_PHM_DIM, "(the rule is n³ parameters)")
        check_positive("phm_rank", self.phm_rank)
        check_positive("reduction_factor", self.reduction_factor)
        check_range("reduction_factor", self.reduction_factor, 1 / MAX_WIDEN, float("inf"),
                    f"(a bottleneck at most {MAX_WIDEN}× wider than the hidden size)")
        check_positive("phm_init_range", self.phm_init_range, allow_zero=True)
        for p in self.placement:
            check_choice("placement", p, ("attn", "ffn", "cross"))
        activation(self.non_linearity)

    def sites(self) -> list[Site]:
        return [Site("sublayer", role, self.stacks, self.leave_out) for role in self.placement]

    def width(self, hidden: int) -> int:
        """Bottleneck width: ``hidden / reduction_factor`` rounded down to a multiple of n."""
        n = self.phm_dim
        return max(n, int(hidden // self.reduction_factor) // n * n)

    def check_hidden(self, hidden: int) -> None:
        """Raise a clear error when ``n`` does not divide the hidden size."""
        if hidden % self.phm_dim:
            divisors = [d for d in range(1, min(hidden, 64) + 1) if hidden % d == 0]
            raise XlpeftValueError(
                f"Compacter with `phm_dim`={self.phm_dim} needs a hidden size divisible by "
                f"{self.phm_dim} (multiples of {self.phm_dim}, e.g. {self.phm_dim * 64}); this "
                f"model's hidden size is {hidden}. For it `phm_dim` can be "
                f"{', '.join(map(str, divisors))}"
            )

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        self.check_hidden(dims.hidden)
        check_range("reduction_factor", self.reduction_factor, 1 / MAX_WIDEN, dims.hidden,
                    f"(width hidden/reduction_factor must be 1..{MAX_WIDEN}·hidden for hidden size {dims.hidden})")
        most = max(dims.hidden, self.width(dims.hidden)) // self.phm_dim
        if self.factorized_phm_w:
            check_range("phm_rank", self.phm_rank, 1, most,
                        f"(each Bᵢ is ({self.width(dims.hidden)}/n)×({dims.hidden}/n): rank ≤ its larger side)")
        if self.shared_phm_rule and not isinstance(shared, PHMRule):
            raise RuntimeError("a Compacter with shared_phm_rule needs the adapter's shared PHMRule")
        return Compacter(dims.hidden, self.width(dims.hidden), self,
                         shared if self.shared_phm_rule else None)

    def build_shared(self, dims: Dims) -> nn.Module | None:
        self.check_hidden(dims.hidden)
        return PHMRule(self.phm_dim, self.phm_init_range) if self.shared_phm_rule else None


class PHMRule(nn.Module):
    """The rule matrices ``A₁ … Aₙ`` as one (n, n, n) tensor."""

    def __init__(self, n: int, init_std: float) -> None:
        super().__init__()
        self.rule = nn.Parameter(torch.randn(n, n, n) * init_std)


class PHMLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W = Σᵢ Aᵢ ⊗ Bᵢ`` (``W`` has shape out × in)."""

    def __init__(self, n_in: int, n_out: int, config: CompacterConfig,
                 rule: PHMRule | None = None) -> None:
        super().__init__()
        n, r = config.phm_dim, config.phm_rank
        self.n, self.n_in, self.n_out = n, n_in, n_out
        if rule is None:
            self.rule = nn.Parameter(torch.randn(n, n, n) * config.phm_init_range)
        else:  # a reference, not a child: the shared rule is stored once, under "shared."
            object.__setattr__(self, "_shared", rule)
        self.factorized = config.factorized_phm_w
        if self.factorized:
            self.left = nn.Parameter(torch.empty(n, n_out // n, r))   # sᵢ
            self.right = nn.Parameter(torch.empty(n, n_in // n, r))   # tᵢ
            params = (self.left, self.right)
        else:
            self.phm = nn.Parameter(torch.empty(n, n_out // n, n_in // n))  # Bᵢ
            params = (self.phm,)
        for p in params:
            for i in range(n):
                nn.init.xavier_uniform_(p.data[i])
        self.bias = nn.Parameter(torch.zeros(n_out))

    def rule_tensor(self) -> torch.Tensor:
        """``A`` as (n, n, n): shared or this layer's own."""
        shared = self.__dict__.get("_shared")
        return shared.rule if shared is not None else self.rule

    def factors(self) -> torch.Tensor:
        """``B`` as (n, out/n, in/n)."""
        if self.factorized:
            return torch.einsum("ipr,iqr->ipq", self.left, self.right)
        return self.phm

    def weight(self) -> torch.Tensor:
        """The dense ``W = Σᵢ Aᵢ ⊗ Bᵢ`` (out × in), rebuilt from the factors."""
        w = torch.einsum("iab,ipq->apbq", self.rule_tensor(), self.factors())
        return w.reshape(self.n_out, self.n_in)

    @torch.no_grad()
    def zero_(self) -> None:
        """Make ``W`` and the bias zero (identity adapter), keeping ``A`` and ``tᵢ`` trainable."""
        (self.left if self.factorized else self.phm).zero_()
        self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class Compacter(nn.Module):
    """One Compacter adapter: ``h + up(f(down(h)))`` with PHM projections."""

    needs_input = False  # sequential: reads the sublayer output only
    has_input_transform = False
    post_norm = False

    def __init__(self, hidden: int, width: int, config: CompacterConfig,
                 rule: PHMRule | None = None) -> None:
        super().__init__()
        self.down = PHMLinear(hidden, width, config, rule)
        self.act = activation(config.non_linearity)
        self.up = PHMLinear(width, hidden, config, rule)
        if config.init_zero_up:
            self.up.zero_()

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))
