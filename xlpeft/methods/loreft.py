"""LoReFT: a low-rank intervention on the hidden states of chosen positions.

Wu et al. 2024, "ReFT: Representation Finetuning for Language Models"
(arXiv:2404.03592); fields and defaults as AdapterHub ``adapters``'
``LoReftConfig`` (``ReftConfig``).

    block i ─► h [B, L, d] ─► at the first ``prefix_positions`` and last ``suffix_positions``:
                 h ← h + Rᵀ(f(W·h + b) − R·h)      R ∈ ℝ^{r×d}, orthonormal rows
                 (other positions untouched)

It acts on the block's output (the residual stream, place ``…block``), in
every family. ``R``'s rows are orthonormalised in the forward (QR of a free
``r × d`` parameter), so the file holds ``r·d`` numbers for it rather than a
``d × d`` basis. Prefix and suffix positions get their own ``(R, W, b)``
unless ``tied_weights``. Suffix positions are the last ones of the padded
tensor: pad on the left for them to be the last real tokens. A new adapter is
*not* the identity (``W``, ``b`` random, as in ReFT) unless ``init_identity``.

It cannot be merged (it edits activations, not weights: ``merge`` says so);
routing per example works (each example's positions get its own adapter).
Adapters at the block output run after every sublayer adapter of that block,
whatever their order in a ``Stack``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xlpeft.errors import XlpeftValueError
from xlpeft.methods._layers import activation
from xlpeft.methods.base import AdapterConfig, Dims, Site, check_positive, check_range, register_method
from xlpeft.methods._targets import check_dropout
from xlpeft.methods.prefix import MAX_VIRTUAL_TOKENS


@register_method
@dataclass(frozen=True)
class LoReFTConfig(AdapterConfig):
    """Rank-``r`` interventions ``h + Rᵀ(Wh + b − Rh)`` at block outputs."""

    method = "loreft"
    r: int = 1
    """Rank of the intervention subspace (``adapters``' LoReFT default 1)."""
    prefix_positions: int = 3
    """How many of the first positions are intervened on."""
    suffix_positions: int = 0
    """How many of the last positions are intervened on (pad on the left)."""
    tied_weights: bool = False
    """One ``(R, W, b)`` for prefix and suffix positions (else one for each side that has positions)."""
    subtract_projection: bool = True
    """Subtract ``R·h`` (LoReFT); False gives ``adapters``' NoReFT/DiReFT-style ``h + Rᵀf(Wh + b)``."""
    non_linearity: str = "identity"
    """``f`` on the learned source ``W·h + b``."""
    dropout: float = 0.0
    """Dropout on the intervened states (training only)."""
    init_identity: bool = False
    """Start with ``W = R``, ``b = 0``: a new adapter is the identity."""
    leave_out: tuple[int, ...] = ()
    """Block indices without an intervention."""
    stacks: tuple[str, ...] = ("encoder", "decoder")
    """Stacks to adapt in encoder-decoder models."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("r", self.r)
        for name in ("prefix_positions", "suffix_positions"):
            check_range(name, getattr(self, name), 0, MAX_VIRTUAL_TOKENS, "(positions per sequence)")
        if self.prefix_positions + self.suffix_positions == 0:
            raise XlpeftValueError("LoReFT needs positions to act on: `prefix_positions` + `suffix_positions` "
                                   "can be ≥ 1; got 0 and 0")
        check_dropout(self.dropout)
        activation(self.non_linearity)

    def sites(self) -> list[Site]:
        return [Site("sublayer", "block", self.stacks, self.leave_out)]

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        check_range("r", self.r, 1, dims.hidden, f"(the subspace of a {dims.hidden}-wide hidden state)")
        return LoReFT(dims.hidden, self)


class ReFTUnit(nn.Module):
    """One ``(R, W, b)``: ``h + Rᵀ(f(Wh + b) − Rh)`` with ``R``'s rows orthonormalised."""

    def __init__(self, hidden: int, config: LoReFTConfig) -> None:
        super().__init__()
        self.rotation = nn.Parameter(torch.linalg.qr(torch.randn(hidden, config.r))[0].t().contiguous())
        self.source = nn.Linear(hidden, config.r)
        self.act = activation(config.non_linearity)
        self.subtract = config.subtract_projection
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        if config.init_identity:
            with torch.no_grad():
                self.source.weight.copy_(self.rotation)
                self.source.bias.zero_()

    def basis(self) -> torch.Tensor:
        """``R`` with orthonormal rows (QR of the free parameter, differentiable)."""
        q, r = torch.linalg.qr(self.rotation.t())
        return (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1)).t()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # 2-D matmuls: torch.matmul folds batch dims differently when an operand requires grad,
        # which would make a frozen (loaded) copy differ from the trained one in the last bit.
        rot, flat = self.basis().to(h.dtype), h.reshape(-1, h.shape[-1])
        edit = self.act(self.source(flat))
        if self.subtract:
            edit = edit - flat @ rot.t()
        return self.dropout(flat + edit @ rot).view_as(h)


class LoReFT(nn.Module):
    """The interventions of one block output: prefix and suffix positions."""

    has_input_transform = False
    post_norm = False
    needs_input = False

    def __init__(self, hidden: int, config: LoReFTConfig) -> None:
        super().__init__()
        self.prefix, self.suffix = config.prefix_positions, config.suffix_positions
        count = 1 if config.tied_weights else (self.prefix > 0) + (self.suffix > 0)
        self.units = nn.ModuleList(ReFTUnit(hidden, config) for _ in range(count))  # [prefix, suffix]

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        length = h.shape[1]
        p, s = min(self.prefix, length), min(self.suffix, length)
        out = h.clone()
        if p:
            out[:, :p] = self.units[0](h[:, :p])
        if s:  # as in ``adapters``: suffix states are scattered last (they win where both overlap)
            out[:, length - s:] = self.units[-1](h[:, length - s:])
        return out
