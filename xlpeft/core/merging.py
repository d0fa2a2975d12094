"""Merging: folding linear adapters (LoRA, (IA)3, BitFit) into backbone weights.

Each linear keeps a merge *stack* (``point.merged``, oldest first); merged
weights act before every unmerged adapter of that linear, so:

    W ─► merged[0] ─► merged[1] ─► … ─► unmerged adapters in setup order

* a merge is allowed only when the active setup, at every linear the adapter
  touches, starts with the merged adapters in merge order (merged adapters the
  setup does not name count as part of the backbone, below it);
* unmerge is last-in-first-out per linear;
* a routed forward, editing or training a merged adapter, and an (IA)3 scale
  that cannot be divided out again are refused;
* every refusal happens before any state changes;
* sharded (FSDP) weights are refused: merge inside
  ``xlpeft.lightning.sharded.full_weights(model, writeback=True)`` (FSDP1).

Deltas are computed in float32 and rounded once into the weight's dtype.
Unmerge restores the weight and bias from a copy taken at merge time, so it is
bit-exact in every dtype (in bf16 ``W + ΔW − ΔW`` is off by up to 2⁻⁸·|W|);
``merge_and_unload`` frees the copies. A bias a merge created on a bias-free
linear belongs to the stack: it goes with its entry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from xlpeft.core.composition import Fuse, Setup, Stack, leaves
from xlpeft.core.points import LinearPoint
from xlpeft.core.sharding import is_sharded, sharded_message
from xlpeft.errors import XlpeftValueError

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel

Item = str | frozenset  # a name in a chain, or names mixed by an Average/BatchSplit


@dataclass
class Saved:
    """What undoes one adapter's merge into one linear."""

    weight: torch.Tensor
    """The weight before the merge."""
    bias: torch.Tensor | None
    """The bias before the merge (None when the linear had none)."""


@dataclass
class Ledger:
    """A model's merge state besides the per-point stacks."""

    order: list[str] = field(default_factory=list)
    """Merged adapters, oldest first."""
    saved: dict[tuple[str, str], Saved] = field(default_factory=dict)
    """(point key, adapter) → what undoes that merge."""
    trainable: dict[str, list[bool]] = field(default_factory=dict)
    """requires_grad of a merged adapter's parameters before merge froze them."""
    added_bias: set[str] = field(default_factory=set)
    """Point keys whose linear got a bias from a merge (kept by ``merge_and_unload``)."""
    suspended: bool = False
    """Inside ``disable_adapters``: merges are undone for the block."""


# --------------------------------------------------------------------------- checks
def linear_modules(model: AdaptedModel, name: str) -> list[tuple[str, LinearPoint, nn.Module]]:
    """(point key, point, module) for every place of ``name``; refuses non-mergeable adapters."""
    model.require_adapters(name)
    found = []
    for key, point in model.points.items():
        if name in point.adapters:
            module = point.adapters[name]
            if not isinstance(point, LinearPoint) or not getattr(module, "mergeable", False):
                raise XlpeftValueError(
                    f"adapter {name!r} ({model.configs[name].method}) cannot be merged: merge "
                    "works for linear-point methods (lora ungated, dora, vera, loha, lokr, ia3, bitfit); "
                    "use it unmerged"
                )
            found.append((key, point, module))
    return found


def chain(setup: Setup | None, point: LinearPoint) -> list[Item]:
    """The order ``setup``'s adapters act in on ``point``'s linear (input scalings last).

    Input transforms run before the weight, so a merge must fold them in after
    every output-side adapter that reads the transformed input.
    """
    items = _items(setup, set(point.adapters.keys()))
    inputs = [i for i in items
              if isinstance(i, str) and getattr(point.adapters[i], "has_input_transform", False)]
    return [i for i in items if i not in inputs] + inputs


def _items(setup: Setup | None, present: set[str]) -> list[Item]:
    if setup is None:
        return []
    if isinstance(setup, str):
        return [setup] if setup in present else []
    if isinstance(setup, (Stack, Fuse)):  # linear points fold a Fuse as a Stack
        return [i for child in setup.children for i in _items(child, present)]
    mixed = frozenset(n for n in leaves(setup) if n in present)
    return [mixed] if mixed else []


def check_agrees(point: LinearPoint, merged: Sequence[str], setup: Setup | None, doing: str) -> None:
    """Refuse when merged weights (acting first, in ``merged`` order) differ from ``setup``."""
    items = chain(setup, point)
    mixed = sorted(n for i in items if isinstance(i, frozenset) for n in i & set(merged))
    if mixed:
        raise XlpeftValueError(
            f"{doing}: at {point.key} the setup {setup!r} mixes merged {mixed} with other adapters "
            "(Average/BatchSplit), but merged weights apply to everything. Unmerge them first"
        )
    named = [i for i in items if i in merged]
    if items[:len(named)] != named or list(merged[len(merged) - len(named):]) != named:
        raise XlpeftValueError(
            f"{doing}: at {point.key} merged weights act first, in merge order {list(merged)}; the "
            f"setup {setup!r} can name merged adapters only at its start, in that order, and only "
            "the last ones merged (a merged adapter it does not name counts as backbone, below it); "
            f"got setup order {[sorted(i) if isinstance(i, frozenset) else i for i in items]}. Merge in "
            "the setup's order (Stack('a', 'b'): merge a, then b) or set_active a setup that matches"
        )


def check_values(name: str, key: str, point: LinearPoint, module: nn.Module) -> None:
    if point.linear.weight.is_meta:
        raise XlpeftValueError(
            f"merge can fold adapters into loaded weights; got {key}'s weight on the meta device "
            f"(offloaded with accelerate, or not loaded yet). Load the weights first, or keep "
            f"{name!r} unmerged"
        )
    for pname, param in module.named_parameters():
        if not bool(torch.isfinite(param.detach()).all()):
            raise XlpeftValueError(f"adapter {name!r} can be merged when its values are finite; got "
                                   f"NaN/inf in {key}.{pname}. Fix or reload its weights")
    check = getattr(module, "check_merge", None)
    if check is not None:
        check()


def check_full(model: AdaptedModel, operation: str) -> None:
    """Refuse ``operation`` on FSDP shards: it writes whole weights (see ``core.sharding``)."""
    if is_sharded(model):
        raise XlpeftValueError(sharded_message(operation))


def check_merge(model: AdaptedModel, names: Sequence[str]) -> None:
    """Everything ``merge`` of ``names`` (in order) could refuse, checked without changing anything."""
    ledger = model._merges
    if ledger.suspended:
        raise XlpeftValueError("merge cannot run inside disable_adapters(); merge after the block")
    check_full(model, "merge")
    stacks = {key: list(p.merged) for key, p in model.points.items()}
    for name in names:
        model.require_adapters(name)
        if name in ledger.order or any(name in s for s in stacks.values()):
            raise XlpeftValueError(f"adapter {name!r} is already merged")
        for key, point, module in linear_modules(model, name):
            check_values(name, key, point, module)
            stacks[key].append(name)
            check_agrees(point, stacks[key], model.active, f"merging {name!r}")


def check_unmerge(model: AdaptedModel, name: str) -> None:
    ledger = model._merges
    model.require_adapters(name)
    if name not in ledger.order:
        raise XlpeftValueError(f"adapter {name!r} is not merged")
    if ledger.suspended:
        raise XlpeftValueError("unmerge cannot run inside disable_adapters(); unmerge after the block")
    check_full(model, "unmerge")
    for key, point in model.points.items():
        if name in point.merged and point.merged[-1] != name:
            later = point.merged[point.merged.index(name) + 1:]
            raise XlpeftValueError(
                f"adapter {name!r} can be unmerged once the adapters merged after it on {point.key} "
                f"are unmerged (last in, first out); got {later} still merged there. "
                f"Unmerge {later[-1]!r} first"
            )


def check_not_merged(model: AdaptedModel, names: Sequence[str], action: str) -> None:
    """Refuse ``action`` (edit, train) on merged adapters: the backbone holds their old values."""
    merged = [n for n in names if n in model._merges.order]
    if merged:
        raise XlpeftValueError(
            f"{action} can take unmerged adapters; got merged {merged}: the backbone weights hold "
            "their values as merged, so a change would silently not act. Unmerge first"
        )


def check_setup(model: AdaptedModel, setup: Setup | None) -> None:
    """Refuse making ``setup`` active when it disagrees with merged weights."""
    for point in model.points.values():
        if isinstance(point, LinearPoint) and point.merged:
            check_agrees(point, point.merged, setup, f"set_active({setup!r})")


def check_routing(model: AdaptedModel) -> None:
    """A routed forward would apply merged weights to every example: refuse it."""
    if model._merges.order:
        raise XlpeftValueError(
            f"a routed forward (adapters=/decoder_adapters=) can run with no adapter merged; got "
            f"{model._merges.order} merged, which would act on every example. Unmerge them first"
        )


# --------------------------------------------------------------------------- state changes
@torch.no_grad()
def apply_merge(model: AdaptedModel, name: str) -> None:
    """Merge ``name`` (already checked) and push it on each linear's stack."""
    ledger = model._merges
    for key, point, module in linear_modules(model, name):
        linear = point.linear
        saved = Saved(linear.weight.detach().clone(),
                      None if linear.bias is None else linear.bias.detach().clone())
        module.merge(linear)
        point.merged.append(name)
        ledger.saved[(key, name)] = saved
        if saved.bias is None and linear.bias is not None:
            ledger.added_bias.add(key)
    params = [p for m in model.adapter_modules(name) for p in m.parameters()]
    ledger.trainable[name] = [p.requires_grad for p in params]
    for p in params:  # a merged adapter does not act: it must not step either
        p.requires_grad_(False)
    ledger.order.append(name)


@torch.no_grad()
def apply_unmerge(model: AdaptedModel, name: str) -> None:
    """Undo ``name``'s merge (already checked to be on top of every stack)."""
    ledger = model._merges
    for key, point, _ in linear_modules(model, name):
        linear = point.linear
        saved = ledger.saved.pop((key, name))
        linear.weight.copy_(saved.weight)
        if saved.bias is None:
            linear.bias = None
            ledger.added_bias.discard(key)
        else:
            linear.bias.copy_(saved.bias)
        point.merged.pop()
    params = [p for m in model.adapter_modules(name) for p in m.parameters()]
    for p, flag in zip(params, ledger.trainable.pop(name, [])):
        p.requires_grad_(flag)
    ledger.order.remove(name)


def merge(model: AdaptedModel, name: str) -> None:
    check_merge(model, [name])
    apply_merge(model, name)


def unmerge(model: AdaptedModel, name: str) -> None:
    check_unmerge(model, name)
    apply_unmerge(model, name)


def forget(model: AdaptedModel, name: str) -> None:
    """Make ``name``'s merge permanent: its entries leave the stacks, the weights stay."""
    ledger = model._merges
    for key, point in model.points.items():
        if name in point.merged:
            point.merged.remove(name)
            ledger.saved.pop((key, name), None)
    ledger.trainable.pop(name, None)
    ledger.order.remove(name)


def merge_and_unload(model: AdaptedModel, names: Sequence[str] | None) -> list[str]:
    """Merge ``names`` in order (None: the active setup's, else those merged) and drop them."""
    if names is None:
        names = leaves(model.active) or list(model._merges.order)
    names = list(names)
    model.require_adapters(*names)
    todo = [n for n in names if n not in model._merges.order]
    check_merge(model, todo)
    for name in todo:
        apply_merge(model, name)
    for name in names:
        forget(model, name)
        model.delete_adapter(name)
    return names


@contextlib.contextmanager
def suspended(model: AdaptedModel) -> Iterator[None]:
    """Undo every merge for the block, then redo them (deterministic: bit-identical weights)."""
    ledger = model._merges
    order = list(ledger.order)
    if order:
        check_full(model, "disable_adapters")  # it unmerges: whole weights are written
    for name in reversed(order):  # reverse merge order is last-in-first-out on every linear
        apply_unmerge(model, name)
    ledger.suspended = True
    try:
        yield
    finally:
        ledger.suspended = False
        for name in order:
            if name in model.configs:  # deleted inside the block: gone
                apply_merge(model, name)
