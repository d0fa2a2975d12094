"""Intrinsic SAID: the update of every adapted weight is a random projection of one small vector.

Aghajanyan et al. 2021, "Intrinsic Dimensionality Explains the Effectiveness
of Language Model Fine-Tuning" (arXiv:2012.13255); the Fastfood transform is
Le et al. 2013, as used by Li et al. 2018 ("Measuring the Intrinsic Dimension
of Objective Landscapes") and the SAID code.

    d ∈ ℝ^{intrinsic_dim} (shared by the adapter, starts at 0)     λ_i: one scale per adapted matrix
    W_i = W_i⁰ + λ_i · reshape(P_i d)        P_i d = (H G Π H B · pad(d))[:D_i] / (√(L·ΣG²) · √(D_i/L))
                                             (the divisor gives P_i columns of unit norm on average)

    H: Walsh–Hadamard (L = 2^⌈log2 D_i⌉), B: random ±1, Π: random permutation, G: Gaussian

Each adapted matrix ``i`` has its own Fastfood factors, drawn from ``seed``
and its place (stack, block, role, shape) and rebuilt on load, never saved
(they are fixed, like VeRA's projections); patterns-matched linears of one
shape share them. Trainable: ``intrinsic_dim`` + one λ per matrix (the
paper's d + m). Memory: 9 bytes per padded weight entry per matrix for the
factors; the projection is a custom autograd function whose backward is
``Pᵀ g`` (two more transforms), so training keeps nothing of it for backward. A new adapter is the identity; ``merge`` folds ``λ_i·P_i d`` into W.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.methods._targets import LinearTargetsConfig
from xlpeft.methods.base import Dims, Site, check_range, register_method

MAX_PADDED = 2 ** 26
"""Largest padded size of one adapted matrix (64 Mi entries)."""


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform (Sylvester order) of the last dimension (a power of 2)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


class _Project(torch.autograd.Function):
    """``V x`` with ``V = T H G Π H B P / norm`` (P: zero-pad, T: truncate), backward ``Vᵀ g``.

    The projection is linear and fixed, so the backward needs only its factors (the
    module's buffers, held on ``ctx``): nothing of the forward is kept.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, ff: Fastfood) -> torch.Tensor:  # noqa: ANN001
        ctx.ff = ff
        return ff.project(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return ctx.ff.project_transposed(grad), None


class Fastfood(nn.Module):
    """A fixed random ``D × d`` projection in ``O(L log L)``: ``(H G Π H B · pad(x))[:D]`` normalised."""

    def __init__(self, d: int, out: int, seed: int) -> None:
        super().__init__()
        self.d, self.out = d, out
        self.padded = 1 << max(out - 1, d - 1, 1).bit_length()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("sign", torch.randint(0, 2, (self.padded,), generator=gen).bool(), persistent=False)
        self.register_buffer("perm", torch.randperm(self.padded, generator=gen).int(), persistent=False)
        self.register_buffer("gauss", torch.randn(self.padded, generator=gen), persistent=False)

    def _factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gauss = self.gauss.to(dtype)
        norm = torch.sqrt(self.padded * gauss.square().sum()) * math.sqrt(self.out / self.padded)
        return torch.where(self.sign, 1.0, -1.0).to(dtype), gauss, norm

    @torch.no_grad()
    def project(self, x: torch.Tensor) -> torch.Tensor:
        sign, gauss, norm = self._factors(x.dtype)
        z = fwht(sign * F.pad(x, (0, self.padded - self.d)))
        return fwht(z[self.perm.long()] * gauss)[:self.out] / norm

    @torch.no_grad()
    def project_transposed(self, g: torch.Tensor) -> torch.Tensor:
        """``Vᵀ g``: ``Pᵀ B H Πᵀ G H Tᵀ g / norm`` (H, B, G symmetric; Πᵀ scatters back)."""
        sign, gauss, norm = self._factors(g.dtype)
        z = fwht(F.pad(g, (0, self.padded - self.out))) * gauss
        back = torch.empty_like(z).index_copy_(0, self.perm.long(), z)
        return (sign * fwht(back))[:self.d] / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Project.apply(x, self)

    def dense(self) -> torch.Tensor:
        """The same projection as a ``D × d`` matrix (tests; small sizes only)."""
        return torch.stack([self(e) for e in torch.eye(self.d, dtype=self.gauss.dtype)], dim=1)


@register_method
@dataclass(frozen=True)
class SAIDConfig(LinearTargetsConfig):
    """Updates of the target linears projected from one ``intrinsic_dim`` vector (plus a scale per matrix)."""

    method = "said"
    intrinsic_dim: int = 1000
    """Size ``d`` of the trained vector, shared by every adapted matrix."""
    seed: int = 0
    """Seed of the Fastfood factors (part of the adapter: it is saved in the config)."""
    init_scale: float = 1.0
    """Initial λ of every matrix."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("intrinsic_dim", self.intrinsic_dim, 1, MAX_PADDED, "(the trained vector's size)")
        check_range("seed", self.seed, 0, 2 ** 62, "(a non-negative integer)")

    def build_shared(self, dims: Dims) -> nn.Module | None:
        return IntrinsicVector(self.intrinsic_dim)

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        size = dims.in_features * dims.out_features
        check_range("intrinsic_dim", self.intrinsic_dim, 1, size,
                    f"(at most the {dims.in_features}×{dims.out_features} weight's size)")
        check_range("weight size", size, 1, MAX_PADDED, "(entries of one adapted matrix)")
        if not isinstance(shared, IntrinsicVector):
            raise RuntimeError("a SAID layer needs its adapter's shared IntrinsicVector")
        place = f"{dims.stack}.{dims.layer}.{site.role}.{dims.in_features}x{dims.out_features}"
        seed = (self.seed * 1_000_003 + zlib.crc32(place.encode())) % 2 ** 63
        return SAID(dims.in_features, dims.out_features, self, shared, seed)


class IntrinsicVector(nn.Module):
    """The adapter's trained ``d`` (zeros: the identity)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.said_d = nn.Parameter(torch.zeros(d))


class SAID(nn.Module):
    """One adapted matrix: ``λ · reshape(P d)``, ``d`` read from the shared vector."""

    has_input_transform = False
    mergeable = True

    def __init__(self, n_in: int, n_out: int, config: SAIDConfig, shared: IntrinsicVector, seed: int) -> None:
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.projection = Fastfood(config.intrinsic_dim, n_in * n_out, seed)
        self.said_lambda = nn.Parameter(torch.tensor(float(config.init_scale)))
        object.__setattr__(self, "_shared", shared)  # a reference: stored once, under "shared."

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        d = self.__dict__["_shared"].said_d.to(dtype)
        return (self.said_lambda.to(dtype) * self.projection(d)).view(self.n_out, self.n_in)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return y + F.linear(flat, self.delta(x.dtype)).view_as(y)

    def delta_weight(self) -> torch.Tensor:
        """``λ·P d`` as an ``out × in`` float32 matrix."""
        return self.delta(torch.float32)

    @torch.no_grad()
    def merge(self, linear: nn.Linear) -> None:
        """``W ← W + ΔW``, summed in float32 and rounded once to W's dtype."""
        delta = self.delta_weight().to(linear.weight.device)
        linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
