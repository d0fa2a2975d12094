"""Intrinsic prompt tuning: soft prompts reconstructed from a low-dimensional code.

Qin et al. 2021, "Exploring Universal Intrinsic Task Subspace via Prompt
Tuning" (IPT, arXiv:2110.07867).

    z ∈ ℝ^k ─► decoder ─► prompt [P, hidden] ─► block 0's frozen W_k, W_v (as ``PromptConfig``)
    decoder:  P·hidden ← W₂·tanh(W₁ z + b₁) + b₂     (``decoder_hidden=0``: W z + b, linear)

Stage 1 (multi-task subspace finding) trains code and decoder
(``train_decoder=True``); stage 2 (intrinsic subspace tuning) trains only the
``k`` numbers of ``z`` for a new task under a frozen decoder
(``train_decoder=False``: the decoder is held in buffers, saved with the
adapter, never trained). The decoder tensors have the same names in both
stages, so a stage-1 adapter's decoder loads into a stage-2 adapter with
``load_adapter_state_dict``. ``subspace_from_prompts`` gives a linear decoder
from prompts trained per task: the optimal linear autoencoder (PCA), with each
task's code. The prompt acts as ``PromptConfig``'s shallow prompt (see
``prompt.py``); it is never the identity, cannot be merged, and routes per example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xlpeft.errors import XlpeftValueError
from xlpeft.methods.base import AdapterConfig, Dims, Site, check_range, register_method
from xlpeft.methods.prefix import MAX_VIRTUAL_TOKENS, check_heads
from xlpeft.methods.prompt import SoftPrompt

MAX_DECODER = 2 ** 25
"""Most entries one decoder matrix may have."""


@register_method
@dataclass(frozen=True)
class IntrinsicPromptConfig(AdapterConfig):
    """``prompt_length`` soft tokens decoded from an ``intrinsic_dim`` code."""

    method = "intrinsic_prompt"
    prompt_length: int = 10
    """Number of soft tokens ``P``."""
    intrinsic_dim: int = 5
    """Size ``k`` of the code (the paper finds 5 dimensions reach most of prompt tuning)."""
    decoder_hidden: int = 64
    """Width of the decoder's tanh layer; 0: a linear decoder ``W z + b``."""
    train_decoder: bool = True
    """True: stage 1 (code and decoder train); False: stage 2 (only the code trains)."""
    stacks: tuple[str, ...] = ("encoder",)
    """Stacks whose first block gets the prompt."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("prompt_length", self.prompt_length, 1, MAX_VIRTUAL_TOKENS, "(soft tokens)")
        check_range("intrinsic_dim", self.intrinsic_dim, 1, 4096, "(the code's size)")
        check_range("decoder_hidden", self.decoder_hidden, 0, 65536, "(0: a linear decoder)")

    def sites(self) -> list[Site]:
        return [Site("prompt", "", self.stacks)]

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        check_heads(dims)
        widest = max(self.decoder_hidden, self.intrinsic_dim) * self.prompt_length * dims.hidden
        if widest > MAX_DECODER:
            raise XlpeftValueError(f"the decoder of {self.prompt_length} tokens × {dims.hidden} from "
                                   f"{max(self.decoder_hidden, self.intrinsic_dim)} units has {widest:,} entries; "
                                   f"at most {MAX_DECODER:,}: lower prompt_length or decoder_hidden")
        return IntrinsicPrompt(dims, self)


class IntrinsicPrompt(SoftPrompt):
    """A soft prompt whose ``embedding`` is ``decoder(z)``."""

    def __init__(self, dims: Dims, config: IntrinsicPromptConfig) -> None:
        nn.Module.__init__(self)
        self.length, self.heads, self.head_dim = config.prompt_length, dims.num_heads, dims.head_dim
        self.from_vocab, self.hidden = False, dims.hidden
        k, h, out = config.intrinsic_dim, config.decoder_hidden, config.prompt_length * dims.hidden
        self.code = nn.Parameter(torch.randn(k))
        shapes = {"dec_out_weight": (out, h or k), "dec_out_bias": (out,)}
        if h:
            shapes = {"dec_in_weight": (h, k), "dec_in_bias": (h,), **shapes}
        for name, shape in shapes.items():
            value = torch.randn(shape) / (shape[-1] ** 0.5 if len(shape) == 2 else 4.0)
            if config.train_decoder:
                self.register_parameter(name, nn.Parameter(value))
            else:  # stage 2: fixed, saved with the adapter, never trained
                self.register_buffer(name, value)

    @property
    def embedding(self) -> torch.Tensor:  # what SoftPrompt.key_values projects
        z = self.code
        if "dec_in_weight" in self._parameters or "dec_in_weight" in self._buffers:
            z = torch.tanh(self.dec_in_weight @ z + self.dec_in_bias)
        return (self.dec_out_weight @ z + self.dec_out_bias).view(self.length, self.hidden)


def subspace_from_prompts(prompts: torch.Tensor, k: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A linear decoder (``decoder_hidden=0``) spanning ``prompts`` ``[tasks, P, hidden]``, and their codes.

    The optimal rank-``k`` linear autoencoder: ``b`` = the mean prompt, ``W`` = the top-``k``
    principal directions; returns ``({"dec_out_weight", "dec_out_bias"}, codes [tasks, k])``.
    """
    if prompts.dim() != 3 or not 1 <= k <= prompts.shape[0]:
        raise XlpeftValueError(f"`prompts` can be [tasks, P, hidden] with at least k={k} tasks; got shape "
                               f"{tuple(prompts.shape)}")
    flat = prompts.reshape(prompts.shape[0], -1).double()
    mean = flat.mean(0)
    _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    basis = vh[:k]  # [k, P·hidden], orthonormal rows
    codes = (flat - mean) @ basis.t()
    return {"dec_out_weight": basis.t().float(), "dec_out_bias": mean.float()}, codes.float()
