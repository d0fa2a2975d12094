"""Layouts: where adapters attach, as data.

A layout names, for one model family, the modules that play each role
(attention output, FFN input/output, q/k/v/o linears, embeddings, LM output
projection) in each stack (encoder, decoder). The injection code reads these
paths and never branches on ``model_type``.

Paths are dotted attribute paths. Stack paths (``root``, ``layers``,
``embed``) and ``word_embeddings`` are relative to ``model.base_model`` (so one
layout serves ``BertModel``, ``BertForMaskedLM`` and
``BertForSequenceClassification`` alike); block paths are relative to one
block (an element of ``layers``); ``lm_output`` candidates are relative to the
top-level model. Width and depth are read off the modules, not the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Logical names of linears inside a block that methods such as LoRA/IA3 target.
LINEAR_ROLES = (
    "q", "k", "v", "o",              # self-attention projections
    "ffn_up", "ffn_down",            # FFN: input-side (may be 2 for gated FFNs) and output-side linears
    "cross_q", "cross_k", "cross_v", "cross_o",  # decoder cross-attention
)


@dataclass(frozen=True)
class StackLayout:
    """One transformer stack (encoder or decoder) of a family."""

    root: str
    """Module of the whole stack; a pre-hook on it marks which stack is running (routing)."""
    layers: str
    """The ``nn.ModuleList`` of blocks."""
    embed: str | None
    """Module whose output is this stack's token embedding (invertible adapters, prompts)."""
    attn_in: str
    """Block module whose first input is the self-attention sublayer input (parallel adapters)."""
    attn_out: str
    """Block module whose output is the self-attention sublayer output, before the residual add."""
    ffn_in: str
    """Block module whose first input is the FFN sublayer input."""
    ffn_out: str
    """Block module whose output is the FFN sublayer output, before the residual add."""
    attn: str
    """The self-attention module that calls the attention function (prefix tuning keys it)."""
    linears: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Logical role (see ``LINEAR_ROLES``) → paths of ``nn.Linear`` inside a block."""
    cross_in: str | None = None
    """Block module whose first input is the cross-attention sublayer input (decoders)."""
    cross_out: str | None = None
    """Block module whose output is the cross-attention sublayer output (decoders)."""
    cross_attn: str | None = None
    """The cross-attention module (decoders)."""
    attn_ln_in: str | None = None
    """Post-LN families: block module whose first input is the self-attention residual (its input)."""
    attn_ln_out: str | None = None
    """Post-LN families: the ``nn.LayerNorm`` applied to self-attention output + residual.

    With ``attn_ln_in`` it is the ``attn_ln`` sublayer site: AdapterHub's canonical Pfeiffer
    placement (``original_ln_before=True``) reads this norm's output and applies it again.
    """
    ffn_ln_in: str | None = None
    """Post-LN families: block module whose first input is the FFN residual (its input)."""
    ffn_ln_out: str | None = None
    """Post-LN families: the ``nn.LayerNorm`` applied to FFN output + residual (``ffn_ln`` site)."""
    cross_ln_in: str | None = None
    """Post-LN decoders: block module whose first input is the cross-attention residual."""
    cross_ln_out: str | None = None
    """Post-LN decoders: the ``nn.LayerNorm`` after cross-attention + residual (``cross_ln`` site)."""


@dataclass(frozen=True)
class Layout:
    """Everything xlpeft needs to know about a model family."""

    family: str
    """Short family name used in adapter files (``bert``, ``t5``, ``m2m_100`` …)."""
    model_types: tuple[str, ...]
    """``config.model_type`` values this layout covers."""
    stacks: Mapping[str, StackLayout]
    """``{"encoder": …}`` for encoders, plus ``"decoder"`` for encoder-decoders."""
    word_embeddings: str
    """The input ``nn.Embedding`` of token ids (vocabulary checks, new scripts)."""
    lm_output: tuple[str, ...] = ()
    """Candidate paths (first that exists wins) of the LM/MLM output projection;
    its input gets the inverse invertible adapter."""
