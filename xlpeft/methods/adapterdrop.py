"""AdapterDrop: no adapters in the lowest ``n`` blocks, in training and/or at inference.

Rücklé et al. 2021, "AdapterDrop: On the Efficiency of Adapters in
Transformers" (arXiv:2010.11918).

    block n-1 … 0:  bare backbone (bit-identical hidden states)    block ≥ n:  adapters act

Two forms, for any adapter config:

* ``adapter_drop(config, n)`` — dropped in training *and* at inference (the
  paper's specialised AdapterDrop): the same config with blocks ``0..n-1``
  added to ``leave_out`` (every part that has one; unions such as
  ``madx-language`` included). Those blocks get no modules at all.
* ``adapter_drop(config, n, train=False)`` or ``inference=False`` — an
  ``AdapterDropConfig`` wrapping one single-method config: every block keeps
  its module, and a module of a block ``< n`` passes its input through while
  the adapter is in the dropped mode (``module.training``). Train with all
  blocks and drop at inference for speed, or train without the lowest blocks
  and use them afterwards. Merging folds only what acts at inference.

The wrapper works for modules of the form ``f(x, h) → h'`` (linear,
sublayer and block places); prefix and prompt modules, and post-norm
(``*-seqbn``) bottlenecks, which re-apply the block's LayerNorm, cannot be
passed through and are refused (use the ``leave_out`` form). Not done: the
paper's robust variant that draws ``n`` at random per training step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xlpeft.errors import XlpeftTypeError, XlpeftValueError
from xlpeft.methods.base import (
    AdapterConfig, ConfigUnion, Dims, Site, check_range, config_from_dict, register_method, short,
)

_PASSABLE = ("linear", "sublayer")


def adapter_drop(config: AdapterConfig, layers: int, train: bool = True, inference: bool = True) -> AdapterConfig:
    """``config`` without adapters in blocks ``0..layers-1`` (in training, at inference or both)."""
    if train and inference:
        return _left_out(config, layers)
    return AdapterDropConfig(config, layers, train, inference)


def _left_out(config: AdapterConfig, layers: int) -> AdapterConfig:
    check_range("layers", layers, 0, 4096, "(the lowest blocks to drop)")
    parts = []
    for part in config.parts:
        in_blocks = any(s.kind not in ("embed", "lm_output") for s in part.sites())
        if not in_blocks:
            parts.append(part)
        elif "leave_out" not in {f.name for f in dataclasses.fields(part)}:
            raise XlpeftValueError(f"AdapterDrop leaves blocks out through `leave_out`; {part.method!r} has no "
                                   "`leave_out` (a prompt sits in block 0 only). Drop it from the config")
        else:
            parts.append(part.replace(leave_out=tuple(sorted(set(part.leave_out) | set(range(layers))))))
    return ConfigUnion(tuple(parts)) if isinstance(config, ConfigUnion) else parts[0]


@register_method
@dataclass(frozen=True)
class AdapterDropConfig(AdapterConfig):
    """One single-method ``config`` whose modules in blocks ``< layers`` pass through when dropped."""

    method = "adapterdrop"
    config: AdapterConfig = field(default_factory=lambda: _default())
    """The wrapped single-method config (a config object, or its dict)."""
    layers: int = 1
    """How many of the lowest blocks (of each stack) drop their adapter."""
    train: bool = True
    """Drop while the module is in training mode."""
    inference: bool = False
    """Drop while the module is in eval mode."""

    def __post_init__(self) -> None:
        if isinstance(self.config, dict):
            object.__setattr__(self, "config", config_from_dict(self.config))
        super().__post_init__()
        if not isinstance(self.config, AdapterConfig) or isinstance(self.config, (ConfigUnion, AdapterDropConfig)):
            raise XlpeftTypeError(f"AdapterDropConfig's `config` can be one single-method config (not a union); "
                                  f"got {type(self.config).__name__} {short(self.config)}. For a union use "
                                  "adapter_drop(config, n) with train and inference both True")
        check_range("layers", self.layers, 0, 4096, "(the lowest blocks to drop)")
        kinds = {s.kind for s in self.config.sites()} - {"embed", "lm_output"}
        if kinds - set(_PASSABLE):
            raise XlpeftValueError(f"AdapterDropConfig can pass through linear and sublayer modules; "
                                   f"{self.config.method!r} sits at {sorted(kinds)}. Use adapter_drop(config, n) "
                                   "(train and inference): it leaves those blocks out")
        if any(s.role.endswith("_ln") for s in self.config.sites()):
            raise XlpeftValueError("AdapterDropConfig cannot pass through post-norm (*-seqbn) bottlenecks: they "
                                   "re-apply the block's LayerNorm. Use adapter_drop(config, n) (train and inference)")

    @property
    def targets(self) -> tuple[str, ...]:  # checked by the model like the wrapped config's
        return getattr(self.config, "targets", ())

    @property
    def target_patterns(self) -> tuple[str, ...]:
        return getattr(self.config, "target_patterns", ())

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.config.to_dict(), "layers": self.layers,
                "train": self.train, "inference": self.inference}

    def sites(self) -> list[Site]:
        return self.config.sites()

    def build_shared(self, dims: Dims) -> nn.Module | None:
        return self.config.build_shared(dims)

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        module = self.config.build(site, dims, shared)
        if dims.layer < 0:  # embeddings, LM output, pattern-matched linears: outside the blocks, kept
            return module
        dropped = 0 <= dims.layer < self.layers
        return Droppable(module, dropped and self.train, dropped and self.inference)


def _default() -> AdapterConfig:
    from xlpeft.methods.bottleneck import BottleneckConfig
    return BottleneckConfig()


class Droppable(nn.Module):
    """An adapter module that passes its input through in the modes it is dropped in."""

    def __init__(self, inner: nn.Module, in_training: bool, at_inference: bool) -> None:
        super().__init__()
        self.inner = inner
        self.drop_training, self.drop_inference = in_training, at_inference

    def __getattr__(self, name: str) -> Any:  # flags the points read (has_input_transform, …) are the inner's
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None or name.startswith("__"):  # half-built (unpickling) or a protocol name
                raise
            return getattr(inner, name)

    @property
    def dropped(self) -> bool:
        return self.drop_training if self.training else self.drop_inference

    def bind(self, linear: nn.Linear) -> None:
        bind = getattr(self.inner, "bind", None)
        if bind is not None:
            bind(linear)

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        return h if self.dropped else self.inner(x, h)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dropped else self.inner.transform_input(x)

    @torch.no_grad()
    def merge(self, linear: nn.Linear) -> None:
        """Fold the inner module unless it is dropped at inference (merging is for inference)."""
        if not self.drop_inference:
            self.inner.merge(linear)
