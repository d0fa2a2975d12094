"""Prompt tuning as shallow virtual tokens of the first attention layer.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning" (P soft tokens, ``P × hidden`` parameters, initialised at random or
from vocabulary embeddings); the shallow/deep distinction follows Liu et al.
2022, "P-Tuning v2".

    soft tokens S[P, hidden] ─► layer 0's own W_k, W_v ─► K, V [heads, P, d]
    block 0 attention:  softmax(q·[K ; k]ᵀ) · [V ; v]      blocks ≥ 1: untouched

What this is, honestly: Lester et al. prepend the soft tokens to the input
sequence, so every layer re-encodes them. Here they are virtual tokens seen
by block 0's self-attention only, projected by that block's frozen key and
value matrices (no pre-attention layer norm, and a LoRA on k/v does not act
on them): the "shallow prompt" of the prefix literature. The trade is
deliberate: the sequence length never changes, so token-classification and
MLM labels stay aligned, the pooler/CLS position is untouched, absolute
position embeddings (BERT, mBART, Marian) need no shifting, routing can give
every example its own prompt, and one mechanism serves all families. The
price is expressiveness: from layer 1 on the prompt acts only through what
block 0 wrote into the real tokens. Use ``PrefixConfig`` for deep prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.methods.base import (
    AdapterConfig, Dims, Site, check_choice, check_positive, check_range, register_method,
)
from xlpeft.methods.prefix import MAX_VIRTUAL_TOKENS, check_heads


@register_method
@dataclass(frozen=True)
class PromptConfig(AdapterConfig):
    """``prompt_length`` soft tokens read by the first block's self-attention."""

    method = "prompt"
    prompt_length: int = 10
    """Number of soft tokens ``P``."""
    init: str = "random"
    """``random`` (uniform in ±0.5, Lester et al.) or ``vocab`` (embeddings of random vocabulary tokens)."""
    stacks: tuple[str, ...] = ("encoder",)
    """Stacks whose first block gets the prompt (``("encoder", "decoder")`` for both)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("prompt_length", self.prompt_length)
        check_range("prompt_length", self.prompt_length, 1, MAX_VIRTUAL_TOKENS, "(soft tokens)")
        check_choice("init", self.init, ("random", "vocab"))

    def sites(self) -> list[Site]:
        return [Site("prompt", "", self.stacks)]

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        check_heads(dims)
        return SoftPrompt(self.prompt_length, dims.hidden, dims.num_heads, dims.head_dim,
                          self.init == "vocab")


class SoftPrompt(nn.Module):
    """``P`` trainable token vectors, turned into keys/values by frozen projections."""

    def __init__(self, length: int, hidden: int, heads: int, head_dim: int, from_vocab: bool) -> None:
        super().__init__()
        self.length, self.heads, self.head_dim = length, heads, head_dim
        self.from_vocab = from_vocab
        self.embedding = nn.Parameter(torch.empty(length, hidden).uniform_(-0.5, 0.5))

    @torch.no_grad()
    def init_from_vocabulary(self, weight: torch.Tensor) -> None:
        """Copy the rows of ``P`` random tokens of a ``[vocab, hidden]`` embedding matrix."""
        ids = torch.randint(0, weight.shape[0], (self.length,))
        self.embedding.copy_(weight[ids.to(weight.device)].to(self.embedding.dtype))

    def key_values(self, projections: tuple[nn.Linear, nn.Linear] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values, each ``[heads, P, head_dim]``, through the block's k/v weights.

        ``F.linear`` on the weights (not the modules) so adapters hooked on k/v
        do not see a batch of ``P`` pseudo-examples.
        """
        if projections is None:
            raise TypeError("SoftPrompt.key_values needs the attention's (k, v) linears")
        out = []
        for linear in projections:
            x = F.linear(self.embedding.to(linear.weight.dtype), linear.weight, linear.bias)
            out.append(x.view(self.length, self.heads, -1).transpose(0, 1))
        return out[0], out[1]

    def logit_bias(self, query: torch.Tensor) -> None:
        """Prompts are ungated."""
        return None
