"""Sparse fine-tunings (SFTs): a sparse difference φ on chosen backbone parameters.

Ansell, Ponti, Korhonen, Vulić 2022, "Composable Sparse Fine-Tuning for
Cross-Lingual Transfer" (ACL 2022, arXiv:2110.07560): LT-SFT, Lottery-Ticket
Sparse Fine-Tuning. Support choices from Guo, Rush, Kim 2021, "Parameter-
Efficient Transfer Learning with Diff Pruning" (ACL 2021, arXiv:2012.07463) and
Sung, Nair, Raffel 2021, "Training Neural Networks with Fixed Sparse Masks"
(NeurIPS 2021, arXiv:2111.09839; FishMask).

    θ (frozen backbone) ──► θ + φ_lang + φ_task ──► the module's forward (this call only)
    φ = (indices, values) per parameter: K flat int64 positions, K float32 values

    LT-SFT   phase 1: fine-tune the eligible θ densely;  keep the K largest |Δθ|
             reset θ;  phase 2: train only those K values (optional L1 pull to 0)
    DiffPruning   learn θ + z ⊙ w with a hard-concrete L0 gate z; keep the open gates
    FishMask      keep the K entries with the largest empirical Fisher E[g²]

An SFT is a named module of an ``AdaptedModel`` like an adapter (``Stack("swh",
"ner")`` applies both; ``xlpeft.core.sft``), saved as an adapter directory with
method ``"sft"``. This file holds the configs only (no torch model code).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from xlpeft.errors import XlpeftValueError
from xlpeft.methods.base import AdapterConfig, Dims, Site, check_choice, register_method

SELECTIONS = ("lt-sft", "diffpruning", "fishmask", "given")

DEFAULT_EXCLUDE = (r"embed", r"(^|\.)(cls|lm_head|pooler|classifier|qa_outputs|shared)\.")
"""Ineligible by default: embeddings and heads (LayerNorms: ``SupportConfig.layer_norm``)."""
LAYER_NORM = r"(LayerNorm|layer_norm|layernorm|(^|\.)ln_?\w*)\."
"""Names of LayerNorm parameters in the supported families."""


@register_method
@dataclass(frozen=True)
class SparseFTConfig(AdapterConfig):
    """Which backbone parameters an SFT changes and how many entries of each.

    Made by the selection functions (``xlpeft.ops.sft_select``) or by
    ``AdaptedModel.add_sft``; a file's config rebuilds the same shapes.
    """

    method: ClassVar[str] = "sft"
    sparse: ClassVar[bool] = True
    """Marks the config of a sparse fine-tuning (applied to weights, not at a point)."""

    params: tuple[str, ...] = ()
    """Backbone parameter names (``model.named_parameters()`` of the HF model), sorted."""
    counts: tuple[int, ...] = ()
    """Stored entries K of each parameter (1..its size)."""
    numels: tuple[int, ...] = ()
    """Size of each parameter: a file from a backbone of other shapes is refused."""
    selection: str = "given"
    """How the support was chosen: ``lt-sft``, ``diffpruning``, ``fishmask`` or ``given``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("selection", self.selection, SELECTIONS)
        if not self.params:
            raise XlpeftValueError("an SFT needs at least one backbone parameter in `params`; got none")
        if not len(self.params) == len(self.counts) == len(self.numels):
            raise XlpeftValueError(f"`params`, `counts` and `numels` need one entry each per parameter; got "
                                   f"{len(self.params)}, {len(self.counts)}, {len(self.numels)}")
        if len(set(self.params)) != len(self.params):
            raise XlpeftValueError("`params` names each backbone parameter once; got a repeat")
        for name, k, n in zip(self.params, self.counts, self.numels):
            if not 0 < k <= n:
                raise XlpeftValueError(f"parameter {name!r} has {n} entries: its count can be 1..{n}; got {k}")

    @property
    def total(self) -> int:
        """K summed over the parameters."""
        return sum(self.counts)

    def sites(self) -> list[Site]:
        return []  # no point site: ``xlpeft.core.sft`` attaches SFTs to the parameters themselves

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        raise XlpeftValueError("an SFT is built on parameters, not at a site; use AdaptedModel.add_adapter")


@dataclass(frozen=True)
class SupportConfig:
    """Which entries may change and how many (K) an SFT keeps (every selection method).

    At most one of ``count``, ``density`` and ``like`` sets K; LT-SFT and FishMask
    need one, DiffPruning without one keeps the gates its L0 penalty left open.
    """

    count: int = 0
    """K as a number of entries (0: use ``density`` or ``like``)."""
    density: float = 0.0
    """K as a fraction of the eligible entries, in (0, 1]."""
    like: str = ""
    """K as the parameter count of this adapter preset on the same model, e.g.
    ``madx-language``: the paper's "as many parameters as an adapter" budget."""
    include: tuple[str, ...] = (r".",)
    """Regexes (``re.search``) over backbone parameter names: eligible when one matches…"""
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    """…and none of these does (default: embeddings and heads)."""
    layer_norm: bool = False
    """Whether LayerNorm weights and biases are eligible (the paper's default: no)."""

    def __post_init__(self) -> None:
        if sum([bool(self.count), bool(self.density), bool(self.like)]) > 1:
            raise XlpeftValueError(
                "set K with one of `count` (entries), `density` (fraction of eligible) or `like` "
                f"(an adapter preset's size, e.g. 'madx-language'); got count={self.count}, "
                f"density={self.density}, like={self.like!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise XlpeftValueError(f"`count` can be a positive integer; got {self.count!r}")
        if self.density and not (isinstance(self.density, (int, float)) and 0 < self.density <= 1
                                 and math.isfinite(self.density)):
            raise XlpeftValueError(f"`density` can be a fraction in (0, 1]; got {self.density!r}")
        for field_name in ("include", "exclude"):
            patterns = tuple(getattr(self, field_name))
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as err:
                    raise XlpeftValueError(f"`{field_name}` can hold regular expressions; got {pattern!r} ({err})")
            object.__setattr__(self, field_name, patterns)

    @property
    def sets_k(self) -> bool:
        return bool(self.count or self.density or self.like)
