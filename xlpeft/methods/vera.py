"""VeRA: frozen random low-rank matrices shared by every layer, trained scaling vectors.

Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation"; computed
as HF PEFT's ``VeraConfig`` does (same seeded projections, same slicing).

    x ─► W ─► y ─► y + Λ_b · B · Λ_d · A · dropout(x)

    A ∈ ℝ^{r×in_max}, B ∈ ℝ^{out_max×r}   frozen, one pair per adapter (seeded, Kaiming
                                          uniform), each layer uses A[:, :in], B[:out, :]
    d ∈ ℝ^r (init ``d_initial``), b ∈ ℝ^out (init 0)   trained, per layer

A layer costs ``r + out`` trained parameters. ``b`` starts at zero, so a new
adapter is the identity; ``merge`` folds ``Λ_b B Λ_d A`` into W. The shared
pair is saved with the adapter (PEFT's ``save_projection=True``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.methods._targets import LinearTargetsConfig, check_dropout
from xlpeft.methods.base import Dims, Site, check_positive, check_range, register_method

MAX_SEED = 2**63 - 1


@register_method
@dataclass(frozen=True)
class VeRAConfig(LinearTargetsConfig):
    """Shared frozen random projections with trained per-layer scalings (VeRA)."""

    method = "vera"
    r: int = 256
    """Rank of the shared random projections (PEFT's default 256; VeRA can afford large ranks)."""
    d_initial: float = 0.1
    """Initial value of every entry of ``d``."""
    dropout: float = 0.0
    """Dropout on the VeRA input branch."""
    projection_seed: int = 0
    """Seed of the frozen ``A`` and ``B`` (PEFT's ``projection_prng_key``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("r", self.r)
        check_dropout(self.dropout)
        check_range("projection_seed", self.projection_seed, 0, MAX_SEED, "(a torch.Generator seed)")

    def build_shared(self, dims: Dims) -> nn.Module | None:
        return VeRAProjections(self.r, self.projection_seed, dims.hidden, dims.hidden)

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        most = max(dims.in_features, dims.out_features)
        check_range("r", self.r, 1, most, f"(VeRA's shared projections of a {dims.in_features}→"
                                          f"{dims.out_features} linear are at most max(in, out) wide)")
        if not isinstance(shared, VeRAProjections):
            raise RuntimeError("a VeRA layer needs its adapter's shared VeRAProjections")
        shared.cover(dims.in_features, dims.out_features)
        return VeRA(dims.in_features, dims.out_features, self, shared)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: U(±√3·√2/√fan_in), drawn from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen ``A`` (r × in_max) and ``B`` (out_max × r) of one adapter (buffers: never trained)."""

    def __init__(self, r: int, seed: int, n_in: int, n_out: int) -> None:
        super().__init__()
        self.r, self.seed = r, seed
        self.register_buffer("vera_A", torch.empty(r, 0))
        self.register_buffer("vera_B", torch.empty(0, r))
        self.cover(n_in, n_out)

    @torch.no_grad()
    def cover(self, n_in: int, n_out: int) -> None:
        """Grow to at least ``n_in`` × ``n_out``, redrawn from the seed: values depend only on the sizes."""
        n_in, n_out = max(n_in, self.vera_A.shape[1]), max(n_out, self.vera_B.shape[0])
        if (n_in, n_out) == (self.vera_A.shape[1], self.vera_B.shape[0]):
            return
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        a = kaiming_uniform((self.r, n_in), generator)  # A first, then B: PEFT's order
        b = kaiming_uniform((n_out, self.r), generator)
        self.vera_A = a.to(device=self.vera_A.device, dtype=self.vera_A.dtype)
        self.vera_B = b.to(device=self.vera_B.device, dtype=self.vera_B.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("vera_A", "vera_B"):  # a saved pair may be larger (more targets): take its size
            value = state_dict.get(prefix + name)
            if value is not None and value.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(value, device=getattr(self, name).device,
                                                     dtype=getattr(self, name).dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class VeRA(nn.Module):
    """The trained scalings of one linear; ``A`` and ``B`` are read from the shared projections."""

    has_input_transform = False
    mergeable = True

    def __init__(self, n_in: int, n_out: int, config: VeRAConfig, shared: VeRAProjections) -> None:
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial)))
        self.vera_lambda_b = nn.Parameter(torch.zeros(n_out))
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        object.__setattr__(self, "_shared", shared)  # a reference: stored once, under "shared."

    def _projections(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.__dict__["_shared"]
        return shared.vera_A[:, :self.n_in].to(dtype), shared.vera_B[:self.n_out, :].to(dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = self._projections(x.dtype)
        h = self.vera_lambda_d * F.linear(self.dropout(x), a)
        return y + self.vera_lambda_b * F.linear(h, b)

    def delta_weight(self) -> torch.Tensor:
        """``Λ_b B Λ_d A`` in float32."""
        a, b = self._projections(torch.float32)
        d, lam_b = self.vera_lambda_d.float(), self.vera_lambda_b.float()
        return lam_b.view(-1, 1) * (b @ (d.view(-1, 1) * a))

    @torch.no_grad()
    def merge(self, linear: nn.Linear) -> None:
        """``W ← W + ΔW``, summed in float32 and rounded once to W's dtype."""
        delta = self.delta_weight().to(linear.weight.device)
        linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
