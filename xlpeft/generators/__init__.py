"""Typology-conditioned adapter generators (layer 4): MAD-G, Hyper-X, typology averaging."""

from xlpeft.generators.averaging import average_by_typology, typology_weights
from xlpeft.generators.base import (
    AdapterGenerator, GeneratedBottleneck, GeneratedConfig, GeneratorConfig, TypologyEncoder,
)
from xlpeft.generators.files import build_generator, load_generator, make_config, save_generator
from xlpeft.generators.hyperx import HyperXConfig, HyperXGenerator
from xlpeft.generators.madg import MadGConfig, MadGGenerator

__all__ = [
    "AdapterGenerator", "GeneratedBottleneck", "GeneratedConfig", "GeneratorConfig", "HyperXConfig",
    "HyperXGenerator", "MadGConfig", "MadGGenerator", "TypologyEncoder", "average_by_typology",
    "build_generator", "load_generator", "make_config", "save_generator", "typology_weights",
]
