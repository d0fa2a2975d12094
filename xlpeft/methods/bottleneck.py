"""Bottleneck adapters: sequential (Houlsby, Pfeiffer) and (scaled) parallel.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP";
Pfeiffer et al. 2021, "AdapterFusion" (FFN-only placement, used by MAD-X);
He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning" (parallel adapters, scaled by s).

    sequential:  x ─► sublayer ─► h ─► h + s·up(f(down(h)))
    parallel:    x ─► sublayer ─► h ─► h + s·up(f(down(x)))

``x`` is the sublayer input and ``h`` its output before the residual add, so
one module serves post-LN (BERT) and pre-LN (T5, mBART) families alike. This
default equals AdapterHub's ``BnConfig(original_ln_before=False)``.

``original_ln_before=True`` is AdapterHub's ``SeqBnConfig`` (the MAD-X paper's
Pfeiffer adapter), post-LN families only: the adapter reads the block's
LayerNorm output and that LayerNorm is applied again after it (r: residual,
i.e. the sublayer input; LN: the block's own norm)::

    s = h + r ─► t = LN(s) ─► t ← res + s·up(f(down(t)))  (per adapter in a Stack)
              ─► LN(t + r)        res: h (residual_before_ln=True), LN(s) (False), s ("post_add")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xlpeft.errors import XlpeftValueError
from xlpeft.methods._layers import MaskedLinear, activation, zero_
from xlpeft.methods.base import (
    MAX_WIDEN, AdapterConfig, Dims, Site, bottleneck_width, check_choice, check_positive, check_range,
    register_method,
)


@register_method
@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """A down-projection, a non-linearity and an up-projection at sublayer outputs."""

    method = "bottleneck"
    reduction_factor: float = 16
    """Hidden size divided by the bottleneck width (MAD-X language adapters use 2)."""
    non_linearity: str = "relu"
    """``relu``, ``gelu``, ``swish``, ``tanh`` or ``identity``."""
    placement: tuple[str, ...] = ("ffn",)
    """Sublayers to adapt: ``attn``, ``ffn``, ``cross`` (decoder cross-attention)."""
    mode: str = "sequential"
    """``sequential`` reads the sublayer output; ``parallel`` reads its input."""
    scaling: float = 1.0
    """Multiplier ``s`` of the adapter output (scaled parallel adapters use 4)."""
    init_zero_up: bool = True
    """Zero the up-projection so a new adapter is the identity."""
    leave_out: tuple[int, ...] = ()
    """Block indices without adapters; MAD-X 2.0 drops the last one: ``(-1,)``."""
    stacks: tuple[str, ...] = ("encoder", "decoder")
    """Stacks to adapt in encoder-decoder models."""
    gated: bool = False
    """Multiply the output by a learned input-dependent gate (UniPELT)."""
    original_ln_before: bool = False
    """AdapterHub's field: read the block LayerNorm's output and re-apply the norm after the
    adapter (``SeqBnConfig``, MAD-X). Needs a post-LN family (BERT, XLM-R) and ``sequential``."""
    residual_before_ln: bool | str = True
    """AdapterHub's field, used with ``original_ln_before``: the adapter's residual is the
    sublayer output before the residual add (True), the norm output (False) or the sum (``post_add``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("reduction_factor", self.reduction_factor)
        check_range("reduction_factor", self.reduction_factor, 1 / MAX_WIDEN, float("inf"),
                    f"(a bottleneck at most {MAX_WIDEN}× wider than the hidden size)")
        check_choice("mode", self.mode, ("sequential", "parallel"))
        for p in self.placement:
            check_choice("placement", p, ("attn", "ffn", "cross"))
        check_choice("residual_before_ln", self.residual_before_ln, (True, False, "post_add"))
        if self.original_ln_before and self.mode != "sequential":
            raise XlpeftValueError(
                f"`original_ln_before=True` can be used with mode 'sequential'; got mode {self.mode!r}. "
                "Parallel adapters read the sublayer input: set original_ln_before=False"
            )
        activation(self.non_linearity)

    def sites(self) -> list[Site]:
        suffix = "_ln" if self.original_ln_before else ""
        return [Site("sublayer", role + suffix, self.stacks, self.leave_out) for role in self.placement]

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        width = bottleneck_width(dims.hidden, self.reduction_factor)
        return Bottleneck(dims.hidden, width, self)


class Bottleneck(nn.Module):
    """One bottleneck adapter: ``h + s·up(f(down(source)))``."""

    # Flags the points read, declared on the class so compiler guards always find them.
    has_input_transform = False
    post_norm = False

    def __init__(self, hidden: int, width: int, config: BottleneckConfig) -> None:
        super().__init__()
        self.down = MaskedLinear(hidden, width)
        self.act = activation(config.non_linearity)
        self.up = MaskedLinear(width, hidden)
        self.parallel = config.mode == "parallel"
        self.scaling = config.scaling
        if config.init_zero_up:
            zero_(self.up)
        self.gate = nn.Linear(hidden, 1) if config.gated else None
        self.post_norm = config.original_ln_before
        self.residual_before_ln = config.residual_before_ln

    @property
    def needs_input(self) -> bool:
        """Parallel and post-norm adapters read the sublayer input, captured by a pre-hook."""
        return self.parallel or self.post_norm

    def delta(self, source: torch.Tensor) -> torch.Tensor:
        """``s·up(f(down(source)))``, gated if configured."""
        delta = self.scaling * self.up(self.act(self.down(source)))
        if self.gate is not None:
            delta = delta * torch.sigmoid(self.gate(source))
        return delta

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(x if self.parallel else h)

    def post_norm_step(self, o: torch.Tensor, r: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """One adapter of a post-norm Stack, as AdapterHub's pre_forward + forward: ``res + delta(LN(o + r))``.

        ``o`` is the previous adapter's output (``h``, the sublayer output, for the first) and
        ``r`` the sublayer's residual input; the residual kept is ``o`` (``residual_before_ln``
        True), ``o + r`` ("post_add") or the normed input (False), as AdapterHub keeps it.
        """
        t = nn.functional.layer_norm(o + r, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        residual = {True: o, False: t, "post_add": o + r}[self.residual_before_ln]
        return residual + self.delta(t)
