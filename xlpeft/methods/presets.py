"""Named presets: the configurations papers and users refer to by name.

``madx-language`` is MAD-X's language adapter (Pfeiffer, reduction factor 2,
plus an invertible adapter); ``mam`` and ``unipelt`` are He et al. 2022's
Mix-and-Match and Mao et al. 2022's UniPELT. ``dora``, ``vera``, ``loha`` and
``lokr`` are HF PEFT's defaults for those methods on the query and value linears.

``s4`` is Chen et al. 2023's S4 design ("Parameter-Efficient Fine-Tuning Design
Spaces", arXiv:2301.01821) for 12-block stacks; ``s4_config(num_layers)`` builds
it for other depths (see its docstring).

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


def _ladder(**kw) -> AdapterConfig:
    from xlpeft.methods.ladder import LadderConfig
    return LadderConfig(**kw)


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
    "said": lambda: SAIDConfig(intrinsic_dim=1000, targets=("q", "v")),
    "far": lambda: FARConfig(targets=("ffn_up",), fraction=0.1),
    "intrinsic-prompt": lambda: _intrinsic_prompt(prompt_length=10, intrinsic_dim=5, decoder_hidden=64),
    "ladder": lambda: _ladder(reduction_factor=8),
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


SPINDLE = (0, 1 / 6, 3 / 6, 5 / 6, 1)
"""Group boundaries of S4's spindle grouping, as shares of the depth (group sizes 1 : 2 : 2 : 1)."""


def spindle_groups(num_layers: int) -> list[tuple[int, ...]]:
    """Blocks ``0..num_layers-1`` in four consecutive groups of sizes about 1 : 2 : 2 : 1 (12 → 2, 4, 4, 2)."""
    bounds = [round(num_layers * c) for c in SPINDLE]
    return [tuple(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def s4_config(num_layers: int = 12, reduction_factor: float = 16, r: int = 8,
              prefix_length: int = 10) -> ConfigUnion:
    """Chen et al. 2023's S4: spindle groups G1..G4, uniform sizes per block, every group tuned,
    and per group G1: adapter + LoRA, G2: adapter + prefix, G3: adapter + prefix + BitFit,
    G4: prefix + BitFit + LoRA (each stack grouped on its own).

    Built from existing methods: one config per method, its ``leave_out`` = the groups
    that do not use it. Uniform allocation: every block of a method gets the same size
    (prefixes are per-block tensors, ``reparametrize=False``, rather than one shared MLP).
    One adapter has one module per linear, so BitFit tunes the biases of the linears
    LoRA leaves alone (k, o, FFN; LoRA takes q, v) — where they meet in G4 both act.
    """
    from xlpeft.methods.base import check_range
    check_range("num_layers", num_layers, 1, 4096, "(blocks per stack)")
    groups = spindle_groups(num_layers)
    uses = {"adapter": (0, 1, 2), "lora": (0, 3), "prefix": (1, 2, 3), "bitfit": (2, 3)}
    left = {m: tuple(i for g, blocks in enumerate(groups) if g not in used for i in blocks)
            for m, used in uses.items()}
    return ConfigUnion((
        BottleneckConfig(reduction_factor=reduction_factor, placement=("ffn",), leave_out=left["adapter"]),
        LoRAConfig(r=r, alpha=2 * r, targets=("q", "v"), leave_out=left["lora"]),
        _prefix(prefix_length=prefix_length, reparametrize=False, leave_out=left["prefix"]),
        BitFitConfig(targets=("k", "o", "ffn_up", "ffn_down"), leave_out=left["bitfit"]),
    ))


PRESETS["s4"] = lambda: s4_config(12)


def preset(name: str) -> AdapterConfig:
    """The config a preset name stands for."""
    if name not in PRESETS:
        raise unknown("preset", name, PRESETS, hint="Or pass a config object such as LoRAConfig(r=8).")
    return PRESETS[name]()
