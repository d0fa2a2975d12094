"""Where the whole-linear methods (LoRA, DoRA, VeRA, LoHa, LoKr) attach.

They all adapt the linears named by layout roles or by module-name regexes;
this base holds those fields, their checks and ``sites``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xlpeft.errors import XlpeftValueError
from xlpeft.methods.base import AdapterConfig, Dims, Site, check_range, short


@dataclass(frozen=True)
class LinearTargetsConfig(AdapterConfig):
    """Base of configs that adapt whole ``nn.Linear`` layers (not registered itself)."""

    targets: tuple[str, ...] = ("q", "v")
    """Layout roles: ``q k v o ffn_up ffn_down cross_q cross_k cross_v cross_o``."""
    target_patterns: tuple[str, ...] = ()
    """Module-name regexes (any model); used instead of ``targets`` when given."""
    leave_out: tuple[int, ...] = ()
    """Block indices to skip."""
    stacks: tuple[str, ...] = ("encoder", "decoder")
    """Stacks to adapt in encoder-decoder models."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for pattern in self.target_patterns:
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as err:
                raise XlpeftValueError(f"`target_patterns` can be regular expressions; {short(pattern)} is "
                                       f"not a valid regular expression ({err})") from err

    def sites(self) -> list[Site]:
        if self.target_patterns:
            return [Site("linear", "", self.stacks, self.leave_out, self.target_patterns)]
        return [Site("linear", t, self.stacks, self.leave_out) for t in self.targets]


def check_rank(field_name: str, r: int, dims: Dims) -> None:
    """Refuse a rank above ``min(in, out)`` of the linear, before anything is allocated."""
    most = min(dims.in_features, dims.out_features)
    check_range(field_name, r, 1, most, f"(the rank of a {dims.in_features}→{dims.out_features} linear "
                                        "is at most min(in, out))")


def check_dropout(value: float) -> None:
    if not 0 <= value < 1:
        raise XlpeftValueError(f"`dropout` must be in [0, 1); got {value!r}")
