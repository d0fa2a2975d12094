"""PEFT methods: one file each, a frozen config dataclass plus its modules."""

from xlpeft.methods.adamix import AdaMixConfig
from xlpeft.methods.adapterdrop import AdapterDropConfig, adapter_drop
from xlpeft.methods.base import AdapterConfig, ConfigUnion, config_from_dict
from xlpeft.methods.bitfit import BitFitConfig
from xlpeft.methods.bottleneck import BottleneckConfig
from xlpeft.methods.compacter import CompacterConfig
from xlpeft.methods.dora import DoRAConfig
from xlpeft.methods.far import FARConfig
from xlpeft.methods.ia3 import IA3Config
from xlpeft.methods.intrinsic_prompt import IntrinsicPromptConfig
from xlpeft.methods.invertible import InvertibleConfig
from xlpeft.methods.krona import KronAConfig
from xlpeft.methods.ladder import LadderConfig, LadderSideTuning
from xlpeft.methods.loha import LoHaConfig
from xlpeft.methods.lokr import LoKrConfig
from xlpeft.methods.lora import LoRAConfig
from xlpeft.methods.loreft import LoReFTConfig
from xlpeft.methods.prefix import PrefixConfig
from xlpeft.methods.presets import PRESETS, preset
from xlpeft.methods.prompt import PromptConfig
from xlpeft.methods.said import SAIDConfig
from xlpeft.methods.sparse import SparseConfig, large_sparse
from xlpeft.methods.vera import VeRAConfig

__all__ = [
    "AdaMixConfig", "AdapterConfig", "AdapterDropConfig", "adapter_drop", "BitFitConfig", "BottleneckConfig", "CompacterConfig", "SparseConfig", "large_sparse", "ConfigUnion", "IA3Config",
    "DoRAConfig", "FARConfig", "IntrinsicPromptConfig", "InvertibleConfig", "KronAConfig", "LadderConfig", "LadderSideTuning", "LoHaConfig", "LoKrConfig", "LoRAConfig", "LoReFTConfig", "VeRAConfig", "PRESETS", "PrefixConfig", "PromptConfig", "SAIDConfig", "config_from_dict", "preset",
]
