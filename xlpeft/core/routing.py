"""Per-example routing that belongs to its call, read by every point.

A ``Route`` says which setup applies to which examples. It is built once per
call from a list of setups (one per example) or from the active setup. Its
setups are kept in a canonical order, and the assignment is a tensor of group
ids, so a new mix of the same setups is the same Python object graph with a
different tensor (``torch.compile`` reuses its graph):

    ["swh", "hin", "swh"] ─► setups ('hin', 'swh'), group ids [1, 0, 1]
        batched   one op per point: the adapters' weights stacked, gathered by group id
                  (``core.batched``; bottleneck, LoRA, (IA)3, prefix — eager and compiled)
        eager     otherwise: gather with perm [1, 0, 2], sizes (1, 2), run each group, scatter back
        compiled  otherwise: run each setup on the whole batch, torch.where over the group ids

A ``Frame`` is the routing of one call: the route per stack (encoder by source
language, decoder by target language), the stack running now, the disabled
flag, the ``Average`` weight providers and per-call captures (a parallel
adapter's sublayer input). Frames live in a ``ContextVar``, so threads and
asyncio tasks routing through one model never see each other's routing.
``Router`` is the model-level part read into each frame at call start: the
active setup and the providers set by ``set_average_weights``.

Activation checkpointing re-runs blocks in backward, after the call's frame is
gone. Whatever enabled it (``AdaptedModel.activation_checkpointing_enable``,
HF's ``gradient_checkpointing_enable`` on the inner model, or a strategy's
``checkpoint_wrapper``), the block's checkpoint function is wrapped in a
``RoutedCheckpoint`` when its stack starts, which runs the block (and its
recomputation) under the frame of the call that saved it.
"""

from __future__ import annotations

import contextlib
import copy
import contextvars
import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from xlpeft.core.composition import BatchSplit, Block, Average, Setup, leaves
from xlpeft.errors import XlpeftTypeError, XlpeftValueError

Weigher = Callable[[Any], torch.Tensor | Sequence[float] | None]  # point -> child weights


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class Route:
    """Groups of examples sharing a setup: group ids, and (eager) one permutation."""

    def __init__(self, setups: Sequence[Setup], ids: Sequence[int] | None = None,
                 device: torch.device | None = None, expandable: bool = False) -> None:
        self.setups = tuple(setups)
        self.names = tuple(dict.fromkeys(n for s in self.setups for n in leaves(s)))
        self.expandable = expandable
        self.batch_size = None if ids is None else len(ids)
        self._cache: dict[tuple[int, torch.device], tuple] = {}
        if ids is None:
            self.gid = None
            return
        perm = sorted(range(len(ids)), key=ids.__getitem__)  # stable: batch order inside a group
        self.sizes = tuple(ids.count(g) for g in range(len(self.setups)))
        self.gid = torch.tensor(ids, dtype=torch.long).to(device or "cpu", non_blocking=True)
        self.perm = torch.tensor(perm, dtype=torch.long).to(self.gid.device, non_blocking=True)
        self.inverse = torch.argsort(self.perm)

    @classmethod
    def single(cls, setup: Setup) -> Route:
        """Every example runs ``setup``: no gathering at all."""
        return cls([setup])

    @classmethod
    def per_example(cls, setups: Sequence[Setup], device: torch.device | None = None,
                    expandable: bool = False) -> Route:
        """One setup per example; equal setups form one group, groups in canonical order."""
        distinct = sorted(set(setups), key=repr)
        if len(distinct) == 1:
            return cls.single(distinct[0])
        index = {s: g for g, s in enumerate(distinct)}
        return cls(distinct, [index[s] for s in setups], device, expandable)

    @property
    def grouped(self) -> bool:
        return self.gid is not None

    def expanding(self, batch: int | None) -> Route:
        """This route, letting generation repeat its examples when it fits ``batch``."""
        if not self.grouped or self.expandable or batch != self.batch_size:
            return self
        other = copy.copy(self)
        other.expandable, other._cache = True, {}
        return other

    def _repeats(self, batch: int) -> int:
        """How often generation repeats each example (1 without expansion); checked."""
        n = self.batch_size
        if batch == n:
            return 1
        if self.expandable and batch % n == 0:
            return batch // n  # generate() repeats each example k times (beams, samples)
        raise XlpeftValueError(
            f"a routing list can have one setup per example: it has {n} setups but a layer saw a "
            f"batch of {batch} examples; pass one adapter name (or setup) per example"
        )

    def _eager(self, batch: int, device: torch.device) -> tuple:
        """(perm, inverse, sizes) for a batch of ``batch`` rows on ``device``."""
        key = (batch, device)
        if key not in self._cache:
            k = self._repeats(batch)
            perm = self.perm.to(device)
            if k > 1:
                perm = (perm[:, None] * k + torch.arange(k, device=device)).reshape(-1)
            self._cache[key] = (perm, torch.argsort(perm), tuple(n * k for n in self.sizes))
        return self._cache[key]

    def group_ids(self, batch: int, device: torch.device) -> torch.Tensor:
        """The group id of every row of a batch of ``batch`` rows."""
        k = self._repeats(batch)
        gid = self.gid.to(device)
        return gid.repeat_interleave(k) if k > 1 else gid

    def dispatch(self, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
        """``fn(setup, *group_tensors)`` for every group, reassembled in batch order."""
        if not self.grouped:
            return fn(self.setups[0], *tensors)
        first = next(t for t in tensors if t is not None)
        if _compiling():  # static shapes: a new mix is new data, not a new graph
            return self._masked(fn, first, tensors)
        perm, inverse, sizes = self._eager(first.shape[0], first.device)
        split = [None if t is None else t.index_select(0, perm).split(sizes) for t in tensors]
        parts = [fn(setup, *[None if s is None else s[g] for s in split])
                 for g, setup in enumerate(self.setups)]
        return torch.cat(parts).index_select(0, inverse)

    def _masked(self, fn: Callable[..., torch.Tensor], first: torch.Tensor,
                tensors: tuple) -> torch.Tensor:
        gid = self.group_ids(first.shape[0], first.device)
        out = fn(self.setups[0], *tensors)
        for g in range(1, len(self.setups)):
            part = fn(self.setups[g], *tensors)
            out = torch.where((gid == g).reshape(-1, *[1] * (part.dim() - 1)), part, out)
        return out


def _check_entry(i: int, setup: Any) -> None:
    if not isinstance(setup, (str, Block)):  # checked before grouping: a list is unhashable
        raise XlpeftTypeError(
            f"each entry of a per-example `adapters` list can be an adapter name, Stack, Fuse or "
            f"Average; got {type(setup).__name__} {setup!r} at position {i}"
        )
    if isinstance(setup, BatchSplit):
        raise XlpeftValueError(
            "a per-example `adapters` list can hold adapter names, Stack, Fuse or Average; got a "
            "BatchSplit inside it. Pass the BatchSplit itself as `adapters=` instead of a list"
        )
    if setup == "":
        raise XlpeftValueError(
            f"an adapter name in a routing list can be a non-empty name; got '' at position {i}. "
            "Give every example the name of an adapter (or a setup)"
        )


def route_for(adapters: Any, batch_size: int | None, device: torch.device | None = None,
              expandable: bool = False) -> Route | None:
    """Turn the ``adapters=`` argument of a call into a Route (checked).

    ``batch_size`` is the declared batch (None: the list's length is); ``expandable``
    lets layers see a whole multiple of it (generation's beams and samples).
    """
    if adapters is None:
        return None
    if isinstance(adapters, BatchSplit):
        adapters = adapters.per_example()
    elif isinstance(adapters, (str, Block)):
        _check_entry(0, adapters)
        return Route.single(adapters)
    if not isinstance(adapters, (list, tuple)):
        raise XlpeftTypeError(
            "`adapters` can be an adapter name, Stack, Fuse, Average, BatchSplit or a list/tuple "
            f"with one of those per example; got {type(adapters).__name__}. Pass a list in batch order"
        )
    for i, setup in enumerate(adapters):
        _check_entry(i, setup)
    if not adapters:
        raise XlpeftValueError("a routing list can have one setup per example; got an empty list")
    if batch_size is not None and len(adapters) != batch_size:
        raise XlpeftValueError(
            f"a routing list can have one setup per example: the batch has {batch_size} "
            f"examples but {len(adapters)} setups were given"
        )
    return Route.per_example(list(adapters), device, expandable)


# --------------------------------------------------------------------------- frames
@dataclass(eq=False)
class Frame:
    """The routing of one call (see the module docstring); never shared between calls."""

    router: Router
    routes: Mapping[str, Route | None]
    """Route per stack name (None: no adapters on that stack)."""
    stack: str
    """The stack running now (set by a pre-hook on each stack's root)."""
    disabled: bool = False
    overrides: Mapping[Average, Weigher] = field(default_factory=dict)
    """Providers set for this call only (``AdaptedModel.average_weights``)."""
    weighers: Mapping[Average, Weigher] = field(default_factory=dict)
    """Persistent providers (read at call start) plus the overrides."""
    given: bool = False
    """Whether this call routes (``adapters=``) rather than running the active setup."""
    captures: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per-call values a point keeps between two of its hooks (keyed by ``id(point)``)."""
    opener: str | None = None
    """The stack whose root opened this frame itself (a direct call of the inner model)."""
    handle: Any = None

    def route(self) -> Route | None:
        """The route for the stack that is running now (None: no adapters)."""
        return None if self.disabled else self.routes.get(self.stack)

    def at(self, stack: str) -> Frame:
        """This call's routing for one block of ``stack`` (own captures; for recomputation)."""
        return replace(self, stack=stack, captures={}, opener=None, handle=None)

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


_FRAMES: contextvars.ContextVar[tuple[Frame, ...]] = contextvars.ContextVar("xlpeft_frames", default=())
# dynamo cannot read a ContextVar; compiled code reads this per-thread mirror of it instead
_MIRROR = threading.local()


def current_frames() -> tuple[Frame, ...]:
    """The frames of the calls running in this context, innermost last."""
    if _compiling():
        return getattr(_MIRROR, "frames", ())
    return _FRAMES.get()


def _push(frame: Frame) -> contextvars.Token:
    # dynamo cannot trace a ContextVar: compiled code breaks the graph here and runs this eagerly
    token = _FRAMES.set(_FRAMES.get() + (frame,))
    _MIRROR.frames = _FRAMES.get()
    return token


def _pop(token: contextvars.Token) -> None:
    _FRAMES.reset(token)
    _MIRROR.frames = _FRAMES.get()


def _under(frame: Frame, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    token = _push(frame)
    try:
        return fn(*args, **kwargs)
    finally:
        _pop(token)


class RoutedCheckpoint:
    """A block's checkpoint function whose (re)computation runs under the saving call's frame."""

    def __init__(self, inner: Callable, router: Router, stack: str) -> None:
        self.inner, self.router, self.stack = inner, router, stack

    def __call__(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        frame = self.router.frame()
        if frame is None:
            return self.inner(fn, *args, **kwargs)
        return self.inner(functools.partial(_under, frame.at(self.stack), fn), *args, **kwargs)


_CHECKPOINT_ATTRS = ("_gradient_checkpointing_func", "checkpoint_fn")  # HF layers, torch CheckpointWrapper


class Router:
    """The model-level routing: active setup, persistent providers, attention points."""

    def __init__(self, stacks: Sequence[str], blocks: Mapping[str, nn.Module] | None = None) -> None:
        self.stacks = tuple(stacks)
        self.blocks = dict(blocks or {})
        self.active: Route | None = None
        self.weighers: dict[Average, Weigher] = {}
        self.attention: dict[nn.Module, list[Any]] = {}
        """Attention module → the prefix/prompt points acting inside it (this model's only)."""
        self.batched = True
        """Run grouped routes as one batched operation per point where they can (``core.batched``);
        False: always the per-group loop (``Route.dispatch``), e.g. to compare the two."""

    def set_active(self, setup: Setup | None) -> None:
        # A BatchSplit is routing: it becomes per-example groups, not one setup.
        self.active = None if setup is None else route_for(setup, None)

    def frame(self) -> Frame | None:
        """This model's innermost frame in the running context, if any."""
        for frame in reversed(current_frames()):
            if frame.router is self:
                return frame
        return None

    @property
    def routes(self) -> Mapping[str, Route | None] | None:
        """The routes of the running call when it routes (None outside a routed call)."""
        frame = self.frame()
        return frame.routes if frame is not None and frame.given else None

    def open(self, routes: Mapping[str, Route | None] | None = None, disabled: bool | None = None,
             overrides: Mapping[Average, Weigher] | None = None) -> Frame:
        """A new frame for a call; what it does not set comes from the enclosing call's frame."""
        outer = self.frame()
        given = routes is not None or (outer is not None and outer.given)
        if routes is None:
            routes = outer.routes if outer is not None else {s: self.active for s in self.stacks}
        if disabled is None:
            disabled = outer.disabled if outer is not None else False
        merged = {**(outer.overrides if outer is not None else {}), **(overrides or {})}
        return Frame(self, routes, self.stacks[0], disabled, merged, {**self.weighers, **merged}, given)

    @contextlib.contextmanager
    def call(self, routes: Mapping[str, Route | None] | None = None, disabled: bool | None = None,
             overrides: Mapping[Average, Weigher] | None = None) -> Iterator[Frame]:
        """Run the block under a new frame (see ``open``)."""
        frame = self.open(routes, disabled, overrides)
        token = _push(frame)
        try:
            yield frame
        finally:
            _pop(token)

    # ----------------------------------------------------------------- stack hooks
    def enter_stack(self, name: str, *_hook_args: object) -> None:
        """Pre-hook on a stack's root: mark ``name`` as running (opening a frame if none is)."""
        frame = self.frame()
        if frame is None:  # the inner model called directly: its own frame
            frame = self.open()
            frame.opener = name
            if _compiling():  # no graph break inside the model: the per-thread mirror only
                _MIRROR.frames = current_frames() + (frame,)
            else:
                frame.handle = _push(frame)
        frame.stack = name
        if not _compiling():
            self.route_checkpointing(name)

    def leave_stack(self, name: str, *_hook_args: object) -> None:
        """Forward hook (always called) on a stack's root: close a frame its pre-hook opened."""
        frame = self.frame()
        if frame is None or frame.opener != name:
            return
        if frame.handle is None:  # opened by compiled code
            _MIRROR.frames = tuple(f for f in current_frames() if f is not frame)
        else:
            _pop(frame.handle)

    def route_checkpointing(self, stack: str) -> None:
        """Wrap the checkpoint function of ``stack``'s blocks, however it was set, once."""
        for block in self.blocks.get(stack, ()):
            for attr in _CHECKPOINT_ATTRS:
                fn = getattr(block, attr, None)
                if fn is not None and not isinstance(fn, RoutedCheckpoint) and callable(fn):
                    setattr(block, attr, RoutedCheckpoint(fn, self, stack))
