"""Per-example routing, computed once per forward and read by every point.

A ``Route`` says which setup applies to which examples. It is built once per
forward from a list of setups (one per example) or from the active setup,
then every adapter point calls ``route.dispatch``: examples are gathered into
groups with one precomputed permutation, each group runs its setup, and the
results are scattered back with the inverse permutation.

    ["swh", "hin", "swh"] ─► groups {swh: [0, 2], hin: [1]} ─► perm [0, 2, 1]

``RoutingState`` holds the active setup, the route of the running forward
(one per stack: encoder by source language, decoder by target language) and
which stack is running, set by pre-hooks on the stacks, and the weight
providers of ``Average`` blocks: ``provider(point)`` gives that point's child
weights (e.g. per layer, learned at test time), read where the point meets it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from xlpeft.core.composition import Average, BatchSplit, Block, Setup, leaves
from xlpeft.errors import XlpeftTypeError, XlpeftValueError


class Route:
    """Groups of examples sharing a setup, with a precomputed permutation."""

    def __init__(self, setups: Sequence[Setup], sizes: Sequence[int] | None = None,
                 perm: torch.Tensor | None = None) -> None:
        self.setups = tuple(setups)
        self.sizes = tuple(sizes) if sizes is not None else None
        self.perm = perm
        self.inverse = torch.argsort(perm) if perm is not None else None
        self.names = frozenset(n for s in self.setups for n in leaves(s))
        self._expanded: dict[tuple[int, torch.device], Route] = {}

    @classmethod
    def single(cls, setup: Setup) -> Route:
        """Every example runs ``setup``: no gathering at all."""
        return cls([setup])

    @classmethod
    def per_example(cls, setups: Sequence[Setup]) -> Route:
        """One setup per example; equal setups form one group."""
        order: dict[Setup, list[int]] = {}
        for i, s in enumerate(setups):
            order.setdefault(s, []).append(i)
        if len(order) == 1:
            return cls.single(next(iter(order)))
        groups = list(order.items())
        perm = torch.tensor([i for _, idx in groups for i in idx], dtype=torch.long)
        route = cls([s for s, _ in groups], [len(idx) for _, idx in groups], perm)
        route.batch_size = len(setups)
        return route

    batch_size: int | None = None

    @property
    def grouped(self) -> bool:
        return self.perm is not None

    def _for(self, batch: int, device: torch.device) -> Route:
        """This route on ``device``, expanded when generation repeats examples."""
        key = (batch, device)
        if key in self._expanded:
            return self._expanded[key]
        if batch % self.batch_size:
            raise XlpeftValueError(
                f"routing was given for {self.batch_size} examples but a layer saw a batch "
                f"of {batch}; pass one adapter name per example"
            )
        k = batch // self.batch_size
        perm = self.perm.to(device)
        if k > 1:  # generate() repeats each example k times (beams, samples)
            perm = (perm[:, None] * k + torch.arange(k, device=device)).reshape(-1)
        route = Route(self.setups, [n * k for n in self.sizes], perm)
        route.batch_size = batch
        self._expanded[key] = route
        return route

    def dispatch(self, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
        """``fn(setup, *group_tensors)`` for every group, reassembled in batch order."""
        if not self.grouped:
            return fn(self.setups[0], *tensors)
        first = next(t for t in tensors if t is not None)
        route = self._for(first.shape[0], first.device)
        split = [None if t is None else t.index_select(0, route.perm).split(route.sizes)
                 for t in tensors]
        parts = [fn(setup, *[None if s is None else s[g] for s in split])
                 for g, setup in enumerate(route.setups)]
        return torch.cat(parts).index_select(0, route.inverse)


def route_for(adapters: Setup | Sequence[Setup] | None, batch_size: int | None) -> Route | None:
    """Turn the ``adapters=`` argument of a forward into a Route (checked)."""
    if adapters is None:
        return None
    if isinstance(adapters, BatchSplit):
        adapters = adapters.per_example()
    if isinstance(adapters, (str,)) or not isinstance(adapters, Sequence):
        return Route.single(adapters)
    odd = next((s for s in adapters if not isinstance(s, (str, Block))), None)
    if odd is not None:  # checked before grouping: a list is unhashable
        raise XlpeftTypeError(
            f"each entry of a per-example `adapters` list can be an adapter name, Stack, Fuse or "
            f"Average; got {type(odd).__name__} {odd!r}"
        )
    if any(isinstance(s, BatchSplit) for s in adapters):
        raise XlpeftValueError(
            "a per-example `adapters` list can hold adapter names, Stack, Fuse or Average; got a "
            "BatchSplit inside it. Pass the BatchSplit itself as `adapters=` instead of a list"
        )
    if batch_size is not None and len(adapters) != batch_size:
        raise XlpeftValueError(
            f"routing needs one adapter setup per example: the batch has {batch_size} "
            f"examples but {len(adapters)} setups were given"
        )
    return Route.per_example(list(adapters))


Weigher = Callable[[Any], torch.Tensor | Sequence[float] | None]  # point -> child weights


class RoutingState:
    """What the adapter points read during a forward."""

    def __init__(self, stacks: Sequence[str]) -> None:
        self.stacks = tuple(stacks)
        self.stack = self.stacks[0]
        self.active: Route | None = None
        self.routes: dict[str, Route | None] | None = None
        self.disabled = False
        self.weighers: dict[Average, Weigher] = {}

    def set_active(self, setup: Setup | None) -> None:
        # A BatchSplit is routing: it becomes per-example groups, not one setup.
        self.active = None if setup is None else route_for(setup, None)

    def route(self) -> Route | None:
        """The route for the stack that is running now (None: no adapters)."""
        if self.disabled:
            return None
        if self.routes is not None:
            return self.routes.get(self.stack, self.active)
        return self.active

    def enter_stack(self, name: str, *_hook_args: object) -> None:
        """Mark stack ``name`` as running (the body of a pre-hook on the stack's root)."""
        self.stack = name

    def average_weights(self, setup: Average, point: Any) -> Sequence[float] | torch.Tensor:
        """``setup``'s child weights at ``point``: its provider's vector, else its own weights."""
        provider = self.weighers.get(setup)
        weights = None if provider is None else provider(point)
        if weights is None:
            return setup.weights
        if len(weights) != len(setup.children):
            shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else len(weights)
            raise XlpeftValueError(
                f"the weight provider of {setup!r} can return None or one weight per child "
                f"({len(setup.children)}); got {shape} at point {getattr(point, 'key', point)!r}. "
                "Return a vector with one entry per Average child"
            )
        return weights

    def snapshot(self) -> tuple:
        """The routing a forward runs under (re-applied when checkpointed blocks re-run)."""
        return (self.routes, self.active, self.stack, self.disabled, dict(self.weighers))

    @contextlib.contextmanager
    def restored(self, snap: tuple) -> Iterator[None]:
        """Run under ``snap`` (from ``snapshot``), then put the current routing back."""
        saved = self.snapshot()
        self.routes, self.active, self.stack, self.disabled, self.weighers = snap
        try:
            yield
        finally:
            self.routes, self.active, self.stack, self.disabled, self.weighers = saved
