"""Prefix tuning: trained key/value vectors prepended in every attention.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation"; the gated variant follows Mao et al. 2022, "UniPELT".

    training (reparametrised, shared by all layers of one adapter):
      E[P, hidden] ─► Linear ─► tanh ─┬─► out₀ ─► K₀, V₀   [heads, P, head_dim]
                                      ├─► out₁ ─► K₁, V₁
                                      └─► …   (one output Linear per attention)
    collapsed / direct:   K_l, V_l are plain tensors
    attention l:  softmax(q·[K_l ; k]ᵀ + [g ; mask]) · [V_l ; v]

Li & Liang's single MLP emits every layer's keys and values at once; its
output Linear is split here into one row block per attention module, which
is the same function with the same parameters. ``collapse`` evaluates the MLP
once and keeps only the per-layer tensors (``reparametrize=False``): smaller
files, identical outputs. The prefix is prepended at attention time, never
written into a generation cache.

Gate (``gated=True``, UniPELT): a per-layer ``Linear(heads·head_dim → 1)``
reads each query vector and scales the prefix's share of attention:
``g = log σ(w·q + b)`` is added to the prefix logits, so the unnormalised
weight of every prefix position is multiplied by ``σ(w·q + b)`` ∈ (0, 1).
It is per query token, hence cache-consistent in generation (UniPELT gates
on the layer input; the query is a linear map of it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.errors import XlpeftValueError
from xlpeft.methods._layers import activation
from xlpeft.methods.base import AdapterConfig, Dims, Site, check_positive, check_range, register_method

MAX_VIRTUAL_TOKENS = 4096
"""Most prefix/prompt positions: each is a key and a value per head in every attention."""


@register_method
@dataclass(frozen=True)
class PrefixConfig(AdapterConfig):
    """``prefix_length`` virtual keys/values in each self- (and cross-) attention."""

    method = "prefix"
    prefix_length: int = 30
    """Number of virtual tokens ``P`` per attention module."""
    bottleneck_size: int = 512
    """Width of the reparametrising MLP (Li & Liang use 512)."""
    non_linearity: str = "tanh"
    """Activation of the MLP: ``tanh`` (Li & Liang), ``relu``, ``gelu`` …"""
    reparametrize: bool = True
    """Train through the shared MLP; ``False`` trains (or holds, once collapsed) the tensors directly."""
    gated: bool = False
    """Scale the prefix's attention weight by a learned per-query gate (UniPELT)."""
    cross_attention: bool = True
    """Also prefix decoder cross-attention (Li & Liang do, for encoder-decoders)."""
    stacks: tuple[str, ...] = ("encoder", "decoder")
    """Stacks to adapt in encoder-decoder models."""
    leave_out: tuple[int, ...] = ()
    """Block indices without a prefix."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("prefix_length", self.prefix_length)
        check_range("prefix_length", self.prefix_length, 1, MAX_VIRTUAL_TOKENS, "(virtual tokens per attention)")
        check_positive("bottleneck_size", self.bottleneck_size)
        activation(self.non_linearity)

    def sites(self) -> list[Site]:
        roles = ("", "cross") if self.cross_attention else ("",)
        return [Site("attention", role, self.stacks, self.leave_out) for role in roles]

    def build_shared(self, dims: Dims) -> nn.Module | None:
        if not self.reparametrize:
            return None
        most = max(1024, 4 * dims.hidden)
        check_range("bottleneck_size", self.bottleneck_size, 1, most,
                    f"(the MLP width: at most max(1024, 4·hidden) for hidden size {dims.hidden})")
        return PrefixEncoder(self.prefix_length, dims.hidden, self.bottleneck_size, self.non_linearity)

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        check_heads(dims)
        return PrefixKV(self.prefix_length, dims.num_heads, dims.head_dim, shared, self.gated)


def check_heads(dims: Dims) -> None:
    """Raise when the backbone's attention sizes could not be read."""
    if dims.num_heads <= 0 or dims.head_dim <= 0:
        raise XlpeftValueError(
            f"attention in {dims.stack} block {dims.layer} has num_heads={dims.num_heads}, "
            f"head_dim={dims.head_dim}; prefix/prompt tuning needs both > 0: the attention module "
            "should expose num_heads/head_dim attributes (or its config num_attention_heads)"
        )


class PrefixEncoder(nn.Module):
    """Li & Liang's reparametrisation up to its output layer: ``tanh(W·E)`` [P, width]."""

    def __init__(self, length: int, hidden: int, width: int, non_linearity: str) -> None:
        super().__init__()
        self.embedding = nn.Embedding(length, hidden)
        self.down = nn.Linear(hidden, width)
        self.act = activation(non_linearity)
        self.width = width

    def forward(self) -> torch.Tensor:
        return self.act(self.down(self.embedding.weight))


class PrefixKV(nn.Module):
    """The prefix keys and values of one attention module."""

    def __init__(self, length: int, heads: int, head_dim: int, shared: PrefixEncoder | None,
                 gated: bool) -> None:
        super().__init__()
        self.length, self.heads, self.head_dim = length, heads, head_dim
        object.__setattr__(self, "encoder", shared)  # owned by the adapter's shared modules
        if shared is None:
            self.kv = nn.Parameter(torch.randn(2, heads, length, head_dim))
        else:
            self.out = nn.Linear(shared.width, 2 * heads * head_dim)
        self.gate = nn.Linear(heads * head_dim, 1) if gated else None

    def key_values(self, projections: tuple[nn.Linear, nn.Linear] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values, each ``[heads, P, head_dim]`` (``projections`` is unused)."""
        if self.encoder is None:
            return self.kv[0], self.kv[1]
        kv = self.out(self.encoder()).view(self.length, 2, self.heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3)
        return kv[0], kv[1]

    def logit_bias(self, query: torch.Tensor) -> torch.Tensor | None:
        """``log σ(gate(q))`` per query token, ``[n, q, 1]``; None when ungated."""
        if self.gate is None:
            return None
        n, heads, q, d = query.shape
        flat = query.transpose(1, 2).reshape(n, q, heads * d)
        return F.logsigmoid(self.gate(flat.to(self.gate.weight.dtype)))

    @torch.no_grad()
    def collapsed(self) -> PrefixKV:
        """The direct form with the MLP evaluated once: same outputs, no MLP."""
        out = PrefixKV(self.length, self.heads, self.head_dim, None, self.gate is not None)
        ref = next(self.parameters())
        out.to(device=ref.device, dtype=ref.dtype)
        k, v = self.key_values()
        out.kv.copy_(torch.stack([k, v]))
        if self.gate is not None:
            out.gate.load_state_dict(self.gate.state_dict())
        return out.requires_grad_(ref.requires_grad)
