"""Composition blocks: how several named adapters act together.

    Stack("swh", "genre")          language adapter under a task adapter
    Fuse("eng", "hin", "swh")      AdapterFusion over their outputs
    Average("eng", "hin", weights=[.7, .3])   weighted output average
    BatchSplit("eng", "swh", batch_sizes=[2, 3])  slices of the batch
    Parallel("ner", "pos")         the same input through each, outputs stacked on the batch

A *setup* is an adapter name or one of these blocks. Nesting is checked once,
when a setup is made active or routed, never in the forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

from xlpeft.errors import XlpeftTypeError, XlpeftValueError


class Block:
    """Base of the composition blocks: an ordered tuple of children."""

    allowed: tuple[type, ...] = ()

    def __init__(self, *children: Setup) -> None:
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])
        if not children:
            raise XlpeftValueError(f"{type(self).__name__} needs at least one child; got none")
        self.children: tuple[Setup, ...] = tuple(children)

    def _key(self) -> tuple:
        return (type(self).__name__, self.children)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Block) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        inner = ", ".join(repr(c) for c in self.children)
        return f"{type(self).__name__}({inner})"


class Stack(Block):
    """Children applied one after another (the output of one feeds the next)."""


class Fuse(Block):
    """AdapterFusion over the children's outputs (a trainable fusion layer)."""

    def __init__(self, *children: str) -> None:
        super().__init__(*children)
        if len(self.children) < 2:
            raise XlpeftValueError(f"Fuse needs at least two adapters; got {self.children}")

    @property
    def key(self) -> str:
        """Name of this fusion's parameters (``a+b+c``)."""
        return "+".join(str(c) for c in self.children)


class Average(Block):
    """Weighted average of the children's outputs (weights sum to one).

    The weights are global; ``AdaptedModel.set_average_weights`` gives one
    vector per point instead (per-layer, learnable: EMEA test-time ensembles).
    """

    def __init__(self, *children: str, weights: Sequence[float] | None = None) -> None:
        super().__init__(*children)
        n = len(self.children)
        weights = [1.0 / n] * n if weights is None else [float(w) for w in weights]
        if len(weights) != n:
            raise XlpeftValueError(f"Average got {n} adapters but {len(weights)} weights")
        total = sum(weights)
        if total <= 0:
            raise XlpeftValueError(f"Average weights must sum to > 0; got {weights}")
        self.weights = tuple(w / total for w in weights)

    def _key(self) -> tuple:
        return (*super()._key(), self.weights)


class BatchSplit(Block):
    """Consecutive slices of the batch, one child each (turned into routing)."""

    def __init__(self, *children: Setup, batch_sizes: Sequence[int]) -> None:
        super().__init__(*children)
        if len(batch_sizes) != len(self.children) or any(int(b) < 0 for b in batch_sizes):
            raise XlpeftValueError(
                f"BatchSplit needs one non-negative size per child ({len(self.children)}); "
                f"got {list(batch_sizes)}"
            )
        self.batch_sizes = tuple(int(b) for b in batch_sizes)

    def _key(self) -> tuple:
        return (*super()._key(), self.batch_sizes)

    def per_example(self) -> list[Setup]:
        """One setup per example, in batch order."""
        return [c for c, n in zip(self.children, self.batch_sizes) for _ in range(n)]


class Parallel(Block):
    """The same input through every child; outputs stacked on the batch dimension (AdapterHub's ``Parallel``).

    ``AdaptedModel.forward`` repeats the batch once per child and routes copy ``i``
    (rows ``i·B … (i+1)·B − 1``) to child ``i``, so the head, its loss and every output
    have ``n·B`` rows in child order (AdapterHub repeats at the first adapter layer;
    the rows are the same because nothing differs before it). It may be the whole
    setup or one child of a top-level ``Stack``: ``Stack("a", Parallel("b", "c"))``
    runs as ``Parallel(Stack("a", "b"), Stack("a", "c"))``.
    """

    def __init__(self, *children: Setup) -> None:
        super().__init__(*children)
        if len(self.children) < 2:
            raise XlpeftValueError(f"Parallel needs at least two children; got {self.children}")


Setup = Union[str, Block]

# What may sit inside what. BatchSplit only at the top: it is routing.
Stack.allowed = (str, Fuse, Average)  # and one Parallel in a top-level Stack (``parallel_branches``)
Parallel.allowed = (str, Stack, Fuse, Average)
Fuse.allowed = (str,)
Average.allowed = (str,)
BatchSplit.allowed = (str, Stack, Fuse, Average)


def validate(setup: Setup, known: Sequence[str] | None = None) -> None:
    """Check nesting (and names, when ``known`` is given); raise a clear error."""
    from xlpeft.errors import unknown

    if isinstance(setup, str):
        if known is not None and setup not in known:
            raise unknown("adapter", setup, known, hint="Add it with add_adapter or load_adapter.")
        return
    if not isinstance(setup, Block):
        raise XlpeftTypeError(
            f"a setup can be an adapter name, Stack, Fuse, Average, BatchSplit or Parallel; "
            f"got {type(setup).__name__}"
        )
    for child in setup.children:
        if not isinstance(child, setup.allowed) and not (isinstance(setup, Stack) and isinstance(child, Parallel)):
            allowed = ", ".join("adapter name" if a is str else a.__name__ for a in setup.allowed)
            raise XlpeftValueError(
                f"{type(setup).__name__} children can be {allowed}; got {child!r}"
                + ("; a top-level Stack can also hold one Parallel" if isinstance(setup, Stack) else "")
            )
        validate(child, known)


def leaves(setup: Setup | None) -> list[str]:
    """Adapter names used by a setup, in order, without repeats."""
    if setup is None:
        return []
    if isinstance(setup, str):
        return [setup]
    out: list[str] = []
    for child in setup.children:
        out += [n for n in leaves(child) if n not in out]
    return out


def fusions(setup: Setup | None) -> list[Fuse]:
    """Every Fuse block inside a setup."""
    if setup is None or isinstance(setup, str):
        return []
    found = [setup] if isinstance(setup, Fuse) else []
    for child in setup.children:
        found += fusions(child)
    return found


def _parallels(setup: Setup) -> int:
    if isinstance(setup, str):
        return 0
    return isinstance(setup, Parallel) + sum(_parallels(c) for c in setup.children)


def _spliced(children: Sequence[Setup]) -> Stack:
    """A Stack of ``children`` with child Stacks spliced in (a Stack cannot hold a Stack)."""
    return Stack(*[g for c in children for g in (c.children if isinstance(c, Stack) else (c,))])


def parallel_branches(setup: Setup | None) -> tuple[Setup, ...] | None:
    """The setup of each ``Parallel`` branch, in batch order; None for a setup without one.

    Raises where a Parallel cannot be run: nested, two in one setup, below anything but a
    top-level Stack, or inside a per-example list.
    """
    if isinstance(setup, (list, tuple)):
        if any(_parallels(s) for s in setup if isinstance(s, (str, Block))):
            raise XlpeftValueError("a per-example `adapters` list cannot hold Parallel (it repeats the whole "
                                   "batch); pass the Parallel itself as `adapters=`")
        return None
    if setup is None or isinstance(setup, str) or not isinstance(setup, Block) or not _parallels(setup):
        return None
    if _parallels(setup) > 1:
        raise XlpeftValueError(f"a setup can hold one Parallel block; got {setup!r}. Nesting Parallel blocks "
                               "is not supported: list every branch in one Parallel")
    if isinstance(setup, Parallel):
        return setup.children
    where = [i for i, c in enumerate(setup.children) if isinstance(c, Parallel)]
    if not isinstance(setup, Stack) or not where:
        raise XlpeftValueError(f"Parallel can be the whole setup or a child of a top-level Stack; got {setup!r}")
    i, inner = where[0], setup.children[where[0]]
    return tuple(_spliced([*setup.children[:i], child, *setup.children[i + 1:]]) for child in inner.children)
