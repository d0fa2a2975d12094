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
        if not self.configs:
            raise XlpeftValueError("ConfigUnion needs at least one config; got none")
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
            raise unknown(f"field of {cls.__name__}", key, names,
                          hint="Check the spelling or the method's docstring.")


def config_from_dict(data: Mapping[str, Any]) -> AdapterConfig:
    """Rebuild a config from ``to_dict`` output, rejecting unknown fields."""
    if not isinstance(data, Mapping) or "method" not in data:
        raise XlpeftValueError(f"an adapter config needs a 'method' key; got {data!r}")
    method = data["method"]
    if method == "union":
        return ConfigUnion(tuple(config_from_dict(c) for c in data.get("configs", ())))
    if method not in CONFIG_CLASSES:
        raise unknown("adapter method", str(method), CONFIG_CLASSES)
    cls = CONFIG_CLASSES[method]
    values = {k: v for k, v in data.items() if k != "method"}
    _check_fields(cls, values)
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) and "tuple" in str(types[k]) else v
              for k, v in values.items()}
    return cls(**values)


def check_choice(field_name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise the standard message when ``value`` is not one of ``choices``."""
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise XlpeftValueError(f"`{field_name}` can be {shown}; got {value!r}")


def check_positive(field_name: str, value: float, allow_zero: bool = False) -> None:
    """Raise the standard message for a size or rate out of range."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = "≥ 0" if allow_zero else "> 0"
        raise XlpeftValueError(f"`{field_name}` must be {bound}; got {value!r}")
