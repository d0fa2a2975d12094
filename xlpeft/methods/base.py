"""Shared vocabulary of every PEFT method: configs, sites and the registry.

A method is a frozen config dataclass that says *where* it attaches
(``sites``) and *what* it puts there (``build``). Where is expressed with
layout roles (``"ffn"``, ``"q"`` …), never with model classes, so methods stay
ignorant of Hugging Face and Lightning.

    config.sites() ──► [Site(kind="sublayer", role="ffn"), …]
    inject (layer 3) resolves each Site on a Layout ──► Dims for each place
    config.build(site, dims) ──► nn.Module kept in that place, keyed by name
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from xlpeft.errors import XlpeftTypeError, XlpeftValueError, unknown

# Where a module can sit. Each kind has its own algebra in ``xlpeft.core.points``.
SITE_KINDS = ("sublayer", "linear", "embed", "lm_output", "attention", "prompt")


@dataclass(frozen=True)
class Site:
    """A kind of place an adapter attaches to, in layout terms."""

    kind: str
    """One of ``SITE_KINDS``."""
    role: str = ""
    """Sublayer (``attn``/``ffn``/``cross``) or linear role (``q``, ``ffn_down`` …)."""
    stacks: tuple[str, ...] = ("encoder", "decoder")
    """Stacks to attach in; missing stacks are skipped."""
    leave_out: tuple[int, ...] = ()
    """Block indices to skip (negative counts from the end)."""
    patterns: tuple[str, ...] = ()
    """For ``linear`` sites: module-name regexes instead of a role (any model)."""


@dataclass(frozen=True)
class Dims:
    """Sizes of one concrete place, read off the backbone."""

    hidden: int
    in_features: int = 0
    out_features: int = 0
    layer: int = -1
    num_layers: int = 0
    num_heads: int = 0
    head_dim: int = 0
    stack: str = "encoder"


@dataclass(frozen=True)
class AdapterConfig:
    """Base of every method config. Subclasses are frozen dataclasses."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_field_types(self)

    def sites(self) -> list[Site]:
        """Places this method attaches to."""
        raise NotImplementedError

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        """The module for one concrete place."""
        raise NotImplementedError

    def build_shared(self, dims: Dims) -> nn.Module | None:
        """Parameters shared by every place of one adapter (e.g. Compacter's factors)."""
        return None

    @property
    def parts(self) -> tuple[AdapterConfig, ...]:
        """The single-method configs this config is made of."""
        return (self,)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``config_from_dict`` inverts it."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with some fields changed (checked like the constructor)."""
        _check_fields(type(self), changes)
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ConfigUnion(AdapterConfig):
    """Several methods under one adapter name (MAM, UniPELT, MAD-X language)."""

    method: ClassVar[str] = "union"
    configs: tuple[AdapterConfig, ...] = field(default_factory=tuple)
    """The member configs; each attaches its own modules."""

    def __post_init__(self) -> None:
        if isinstance(self.configs, list):
            object.__setattr__(self, "configs", tuple(self.configs))
        if not isinstance(self.configs, tuple) or not self.configs:
            raise XlpeftValueError(
                f"ConfigUnion needs at least one config (a list of configs); got {short(self.configs)}")
        for c in self.configs:
            if not isinstance(c, AdapterConfig) or isinstance(c, ConfigUnion):
                raise XlpeftTypeError(
                    f"ConfigUnion members can be single-method configs; got {type(c).__name__}"
                )
        kinds = [c.method for c in self.configs]
        if len(set(kinds)) != len(kinds):
            raise XlpeftValueError(f"ConfigUnion can hold each method once; got {kinds}")

    @property
    def parts(self) -> tuple[AdapterConfig, ...]:
        return self.configs

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "configs": [c.to_dict() for c in self.configs]}


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {}


def register_method(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make a config loadable by its ``method`` name."""
    CONFIG_CLASSES[cls.method] = cls
    return cls


def _check_fields(cls: type[AdapterConfig], values: Mapping[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise unknown(f"field of {cls.__name__}", str(key)[:80], names,
                          hint="Check the spelling or the method's docstring.")


def config_from_dict(data: Mapping[str, Any]) -> AdapterConfig:
    """Rebuild a config from ``to_dict`` output, rejecting unknown fields and wrong types."""
    if not isinstance(data, Mapping) or "method" not in data:
        raise XlpeftValueError(f"an adapter config needs a 'method' key (an object like "
                               f"{{'method': 'lora', 'r': 8}}); got {short(data)}")
    method = data["method"]
    if not isinstance(method, str):
        raise XlpeftTypeError(f"`method` can be a method name ({', '.join(sorted(CONFIG_CLASSES))}); "
                              f"got {type(method).__name__} {short(method)}")
    if method == "union":
        extra = sorted(set(data) - {"method", "configs"})
        members = data.get("configs", ())
        nested = isinstance(members, (list, tuple)) and any(
            isinstance(c, Mapping) and c.get("method") == "union" for c in members)
        if extra or nested or not isinstance(members, (list, tuple)):
            raise XlpeftValueError(f"a 'union' config can hold 'method' and a list 'configs' of single-method "
                                   f"configs (no union inside a union); got keys "
                                   f"{sorted(map(str, data))[:8]} with configs {short(members)}")
        return ConfigUnion(tuple(config_from_dict(c) for c in members))
    if method not in CONFIG_CLASSES:
        raise unknown("adapter method", method[:80], CONFIG_CLASSES)
    cls = CONFIG_CLASSES[method]
    values = {k: v for k, v in data.items() if k != "method"}
    _check_fields(cls, values)
    return cls(**values)


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about arbitrary input."""
    text = repr(value) if not isinstance(value, (dict, list, tuple)) or len(value) < 50 else \
        f"<{type(value).__name__} of {len(value)} items>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


_SCALARS = {"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true or false"}
_TUPLE = re.compile(r"tuple\[(\w+), \.\.\.\]")
MAX_LIST = 4096
"""Longest list field a config accepts (targets, leave_out …)."""


def _fits(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str) and len(value) <= 4096
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, numbers.Integral)
    return isinstance(value, numbers.Real) and math.isfinite(value)


def check_field_types(config: Any) -> None:
    """Check every scalar and ``tuple[x, ...]`` field against its annotation (lists become tuples).

    Runs first in every config's ``__post_init__``, so a ``"2"`` or a list where a
    number goes is named here rather than failing later inside torch.
    """
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        tuple_of = _TUPLE.fullmatch(kind)
        if tuple_of and tuple_of[1] in _SCALARS:
            if isinstance(value, list):
                value = tuple(value)
            if not (isinstance(value, tuple) and len(value) <= MAX_LIST and all(_fits(v, tuple_of[1]) for v in value)):
                raise XlpeftTypeError(f"`{f.name}` can be a list of {tuple_of[1]} (at most {MAX_LIST}); got "
                                      f"{type(value).__name__} {short(value)}")
        elif kind in _SCALARS:
            if not _fits(value, kind):
                raise XlpeftTypeError(f"`{f.name}` can be {_SCALARS[kind]}; got {type(value).__name__} {short(value)}")
        else:
            continue
        if kind == "int":
            value = int(value)
        elif kind == "float" and not isinstance(value, (int, float)):
            value = float(value)
        object.__setattr__(config, f.name, value)


def check_choice(field_name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise the standard message when ``value`` is not one of ``choices``."""
    if not any(isinstance(value, type(c)) and value == c for c in choices):
        shown = ", ".join(repr(c) for c in choices)
        raise XlpeftValueError(f"`{field_name}` can be {shown}; got {short(value)}")


def check_positive(field_name: str, value: float, allow_zero: bool = False) -> None:
    """Raise the standard message for a size or rate out of range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise XlpeftTypeError(f"`{field_name}` can be a finite number; got {type(value).__name__} {short(value)}")
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = "≥ 0" if allow_zero else "> 0"
        raise XlpeftValueError(f"`{field_name}` must be {bound}; got {value!r}")


def check_range(field_name: str, value: float, low: float, high: float, why: str) -> None:
    """Raise "`field` can be low..high (why); got value" before anything of that size is allocated."""
    if not low <= value <= high:
        raise XlpeftValueError(f"`{field_name}` can be {low:g}..{high:g} {why}; got {value!r}")


MAX_WIDEN = 16
"""A bottleneck may be at most this many times wider than the hidden size (reduction_factor ≥ 1/16)."""


def bottleneck_width(hidden: int, reduction_factor: float, field_name: str = "reduction_factor") -> int:
    """``hidden / reduction_factor`` as a width in 1..16·hidden, refused (not clamped) outside it."""
    check_range(field_name, reduction_factor, 1 / MAX_WIDEN, hidden,
                f"(width hidden/{field_name} must be 1..{MAX_WIDEN}·hidden for hidden size {hidden})")
    return max(1, int(hidden // reduction_factor))
