"""FAR: freeze the FFN and reconfigure a few of its rows as trainable.

Vucetic et al. 2022, "Efficient Fine-Tuning of BERT Models on the Edge"
(Freeze And Reconfigure, arXiv:2205.01541).

    W ∈ ℝ^{out×in} (frozen)     rows S ⊂ {0..out-1}, |S| = ⌈fraction·out⌉
    y = W x + b  ─►  y[S] += ΔR x + Δb         ΔR ∈ ℝ^{|S|×in}, Δb ∈ ℝ^{|S|} (start at 0)

Only the selected rows train, stored row-wise (``far_rows`` with the rows'
update, not a dense ``out × in`` delta), so optimizer state and files are
``|S|·(in+1)`` per linear. The paper picks the rows of the first FFN linear
(the FFN nodes). Rows are chosen from the frozen linear when the adapter is
attached (``bind``): ``select="magnitude"`` takes the rows of largest L1 norm,
``"random"`` a seeded draw; neither is saved, so load onto the same backbone
(with nothing merged into those linears first). Not done: the paper's
priming phase that ranks rows by how much they change in a short full
fine-tuning run. ``merge`` adds ``ΔR`` (and ``Δb``) to the selected rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.errors import XlpeftValueError
from xlpeft.methods._targets import LinearTargetsConfig
from xlpeft.methods.base import Dims, Site, check_choice, check_range, register_method


@register_method
@dataclass(frozen=True)
class FARConfig(LinearTargetsConfig):
    """A trainable update of the ``fraction`` of rows chosen by ``select`` in each target linear."""

    method = "far"
    targets: tuple[str, ...] = ("ffn_up",)
    """Layout roles; the paper's rows are those of the first FFN linear (``ffn_up``)."""
    fraction: float = 0.1
    """Share of each linear's rows (output features) that train."""
    select: str = "magnitude"
    """``magnitude`` (largest L1 row norm of the frozen weight) or ``random`` (seeded by ``seed``)."""
    seed: int = 0
    """Seed of ``select="random"``."""
    bias: bool = True
    """Also train the selected rows' bias entries (needs linears with a bias)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("fraction", self.fraction, 1e-9, 1, "(a share of the rows)")
        check_choice("select", self.select, ("magnitude", "random"))
        check_range("seed", self.seed, 0, 2 ** 62, "(a non-negative integer)")

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        rows = max(1, math.ceil(self.fraction * dims.out_features))
        return FAR(dims.in_features, dims.out_features, rows, self, dims.layer)


class FAR(nn.Module):
    """The trainable rows of one linear: their indices (chosen at ``bind``) and their update."""

    has_input_transform = False
    mergeable = True

    def __init__(self, n_in: int, n_out: int, rows: int, config: FARConfig, layer: int) -> None:
        super().__init__()
        self.n_out, self.select = n_out, config.select
        self.seed = config.seed * 1_000_003 + max(layer, 0)
        self.register_buffer("rows", torch.arange(rows), persistent=False)  # set by ``bind``
        self.far_rows = nn.Parameter(torch.zeros(rows, n_in))
        self.far_bias = nn.Parameter(torch.zeros(rows)) if config.bias else None

    @torch.no_grad()
    def bind(self, linear: nn.Linear) -> None:
        """Choose the rows from the frozen ``linear`` (its point calls this when attaching)."""
        if self.far_bias is not None and linear.bias is None:
            raise XlpeftValueError("FAR `bias=True` trains bias entries, but this linear has no bias (e.g. T5); "
                                   "use FARConfig(bias=False)")
        k = self.far_rows.shape[0]
        if self.select == "magnitude":
            chosen = linear.weight.detach().float().abs().sum(1).topk(k).indices
        else:
            chosen = torch.randperm(self.n_out, generator=torch.Generator().manual_seed(self.seed))[:k]
        self.rows = chosen.sort().values.to(self.far_rows.device)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``ΔR x + Δb`` for the selected rows, ``[..., |S|]``."""
        flat = x.reshape(-1, x.shape[-1])  # 2-D: the same kernels frozen or trained
        bias = None if self.far_bias is None else self.far_bias.to(x.dtype)
        return F.linear(flat, self.far_rows.to(x.dtype), bias).view(*x.shape[:-1], -1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.index_add(-1, self.rows, self.update(x).to(y.dtype))

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense ``out × in`` float32 matrix (zero outside the selected rows)."""
        dense = self.far_rows.new_zeros(self.n_out, self.far_rows.shape[1], dtype=torch.float32)
        return dense.index_copy(0, self.rows, self.far_rows.float())

    @torch.no_grad()
    def merge(self, linear: nn.Linear) -> None:
        """``W[S] += ΔR`` and ``b[S] += Δb``, in float32, rounded once."""
        weight = linear.weight.float().index_add(0, self.rows, self.far_rows.float().to(linear.weight.device))
        linear.weight.copy_(weight.to(linear.weight.dtype))
        if self.far_bias is not None:
            bias = linear.bias.float().index_add(0, self.rows, self.far_bias.float().to(linear.bias.device))
            linear.bias.copy_(bias.to(linear.bias.dtype))
