"""Named presets: the configurations papers and users refer to by name.

``madx-language`` is MAD-X's language adapter (Pfeiffer, reduction factor 2,
plus an invertible adapter); ``mam`` and ``unipelt`` are He et al. 2022's
Mix-and-Match and Mao et al. 2022's UniPELT. ``dora``, ``vera``, ``loha`` and
``lokr`` are HF PEFT's defaults for those methods on the query and value linears.

``pfeiffer`` reads the FFN output before the residual add (AdapterHub's
``BnConfig(original_ln_before=False)``; every family). ``pfeiffer-seqbn`` and
``madx-language-seqbn`` are AdapterHub's ``SeqBnConfig`` placement, the MAD-X
paper's: after the residual add and the block LayerNorm, which is applied
again (post-LN families: BERT, XLM-R). Language and task adapters of one Stack
should share a placement: adapters at different places of a block run in
block order, not in Stack order.
"""

from __future__ import annotations

from collections.abc import Callable

from xlpeft.errors import unknown
from xlpeft.methods.adamix import AdaMixConfig
from xlpeft.methods.adapterdrop import adapter_drop
from xlpeft.methods.base import AdapterConfig, ConfigUnion
from xlpeft.methods.bitfit import BitFitConfig
from xlpeft.methods.bottleneck import BottleneckConfig
from xlpeft.methods.dora import DoRAConfig
from xlpeft.methods.far import FARConfig
from xlpeft.methods.ia3 import IA3Config
from xlpeft.methods.invertible import InvertibleConfig
from xlpeft.methods.krona import KronAConfig
from xlpeft.methods.loha import LoHaConfig
from xlpeft.methods.lokr import LoKrConfig
from xlpeft.methods.lora import LoRAConfig
from xlpeft.methods.said import SAIDConfig
from xlpeft.methods.loreft import LoReFTConfig
from xlpeft.methods.vera import VeRAConfig


def _prefix(**kw) -> AdapterConfig:
    from xlpeft.methods.prefix import PrefixConfig
    return PrefixConfig(**kw)


def _prompt(**kw) -> AdapterConfig:
    from xlpeft.methods.prompt import PromptConfig
    return PromptConfig(**kw)


def _intrinsic_prompt(**kw) -> AdapterConfig:
    from xlpeft.methods.intrinsic_prompt import IntrinsicPromptConfig
    return IntrinsicPromptConfig(**kw)


def _compacter(**kw) -> AdapterConfig:
    from xlpeft.methods.compacter import CompacterConfig
    return CompacterConfig(**kw)


PRESETS: dict[str, Callable[[], AdapterConfig]] = {
    "pfeiffer": lambda: BottleneckConfig(reduction_factor=16, placement=("ffn",)),
    "houlsby": lambda: BottleneckConfig(reduction_factor=16, placement=("attn", "ffn")),
    "parallel": lambda: BottleneckConfig(reduction_factor=2, placement=("ffn",),
                                         mode="parallel", scaling=4.0),
    "lora": lambda: LoRAConfig(r=8, alpha=16, targets=("q", "v")),
    "ia3": lambda: IA3Config(),
    "bitfit": lambda: BitFitConfig(),
    "prefix": lambda: _prefix(),
    "prompt": lambda: _prompt(),
    "compacter": lambda: _compacter(),
    "dora": lambda: DoRAConfig(r=8, alpha=16, targets=("q", "v")),
    "vera": lambda: VeRAConfig(r=256, targets=("q", "v")),
    "loha": lambda: LoHaConfig(r=8, alpha=8, targets=("q", "v")),
    "lokr": lambda: LoKrConfig(r=8, alpha=8, targets=("q", "v")),
    "krona": lambda: KronAConfig(targets=("q", "v")),
    "loreft": lambda: LoReFTConfig(r=1, prefix_positions=3),
    "adamix": lambda: AdaMixConfig(kind="bottleneck", num_experts=4, reduction_factor=16),
    "pfeiffer-drop5": lambda: adapter_drop(BottleneckConfig(reduction_factor=16, placement=("ffn",)), 5),
    "said": lambda: SAIDConfig(intrinsic_dim=1000, targets=("q", "k", "v", "o", "ffn_up", "ffn_down")),
    "far": lambda: FARConfig(targets=("ffn_up",), fraction=0.1),
    "intrinsic-prompt": lambda: _intrinsic_prompt(prompt_length=10, intrinsic_dim=5, decoder_hidden=64),
    "adamix-lora": lambda: AdaMixConfig(kind="lora", num_experts=4, r=8, alpha=16, targets=("q", "v")),
    "mam": lambda: ConfigUnion((
        _prefix(prefix_length=30),
        BottleneckConfig(reduction_factor=2, placement=("ffn",), mode="parallel", scaling=4.0),
    )),
    "unipelt": lambda: ConfigUnion((
        LoRAConfig(r=8, alpha=16, targets=("q", "v"), gated=True),
        _prefix(prefix_length=10, gated=True),
        BottleneckConfig(reduction_factor=16, placement=("ffn",), gated=True),
    )),
    "madx-language": lambda: ConfigUnion((
        BottleneckConfig(reduction_factor=2, placement=("ffn",)),
        InvertibleConfig(reduction_factor=2),
    )),
    "pfeiffer-seqbn": lambda: BottleneckConfig(reduction_factor=16, placement=("ffn",), original_ln_before=True),
    "madx-language-seqbn": lambda: ConfigUnion((
        BottleneckConfig(reduction_factor=2, placement=("ffn",), original_ln_before=True),
        InvertibleConfig(reduction_factor=2),
    )),
}


def preset(name: str) -> AdapterConfig:
    """The config a preset name stands for."""
    if name not in PRESETS:
        raise unknown("preset", name, PRESETS, hint="Or pass a config object such as LoRAConfig(r=8).")
    return PRESETS[name]()
