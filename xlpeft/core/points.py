"""Adapter points: the places in a backbone where named adapters act.

A point owns the modules of every adapter attached at one place (a
``ModuleDict`` keyed by adapter name) and the hooks on the backbone modules
that call them. Each kind has its own algebra for the composition blocks:

    sublayer   h ─► Stack: fold · Average: h + Σ w(aᵢ(h) − h) · Fuse: fusion
    linear     y = W·T_in(x) ─► Stack: fold T_out · Average: y + Σ w(Tᵢ(x, y) − y)
    embed      e ─► invertible forward, in Stack order
    lm_output  z ─► invertible inverse, in reverse Stack order

Routing (which setup runs for which example) comes from the shared
``RoutingState``; points never compute groups themselves. An ``Average``'s
weights ``w`` are its own, or, while a weight provider is set for it
(``AdaptedModel.set_average_weights``), a vector per point from that provider.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.core.composition import Average, Fuse, Setup, Stack
from xlpeft.methods.fusion import Fusion
from xlpeft.core.routing import RoutingState

Leaf = Callable[[str, torch.Tensor], torch.Tensor | None]
Weigh = Callable[[Average], Sequence[float] | torch.Tensor]


def fold(setup: Setup, h: torch.Tensor, leaf: Leaf, fuse: Callable | None = None,
         reverse: bool = False, weigh: Weigh | None = None) -> torch.Tensor:
    """Apply ``setup`` to ``h``; ``leaf(name, h)`` returns None where absent.

    ``weigh(average)`` gives an ``Average``'s child weights (default: its own).
    """
    if isinstance(setup, str):
        out = leaf(setup, h)
        return h if out is None else out
    if isinstance(setup, Stack):
        for child in (reversed(setup.children) if reverse else setup.children):
            h = fold(child, h, leaf, fuse, reverse, weigh)
        return h
    if isinstance(setup, Average):
        outs = [fold(c, h, leaf, fuse, reverse, weigh) for c in setup.children]
        weights = setup.weights if weigh is None else weigh(setup)
        if isinstance(weights, torch.Tensor):
            weights = weights.to(device=h.device, dtype=h.dtype)
        return h + sum(weights[i] * (o - h) for i, o in enumerate(outs))
    if isinstance(setup, Fuse) and fuse is not None:
        return fuse(setup, h, [fold(c, h, leaf, fuse, reverse, weigh) for c in setup.children])
    if isinstance(setup, Fuse):  # fusion only mixes sublayer adapters; elsewhere: in order
        return fold(Stack(*setup.children), h, leaf, None, reverse, weigh)
    raise TypeError(f"unexpected setup {setup!r}")


def _first(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class AdapterPoint(nn.Module):
    """Base: the adapters at one place and the hooks that run them."""

    def __init__(self, state: RoutingState, stacks: tuple[str, ...]) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        object.__setattr__(self, "state", state)
        self.stacks = stacks
        self.handles: list[Any] = []
        self.merged: list[str] = []  # this place's merge stack, oldest first (kept by core.merging)
        self.key = ""  # the place key (``encoder.0.ffn``), set by the model: names this point to providers

    def _route(self):
        """The route if any adapter of this point may run now, else None."""
        route = self.state.route()
        if route is None or self.state.stack not in self.stacks:
            return None
        if route.names.isdisjoint(self.adapters.keys()) or route.names <= set(self.merged):
            return None
        return route

    def _weigh(self, setup: Average) -> Sequence[float] | torch.Tensor:
        """``setup``'s child weights at this point (its own unless a provider is set)."""
        return self.state.average_weights(setup, self)

    def _leaf(self, name: str) -> nn.Module | None:
        if name in self.merged or name not in self.adapters:
            return None
        return self.adapters[name]

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class SublayerPoint(AdapterPoint):
    """Bottleneck-style adapters at a sublayer output (input captured for parallel)."""

    def __init__(self, state: RoutingState, stacks: tuple[str, ...], hidden: int) -> None:
        super().__init__(state, stacks)
        self.fusions = nn.ModuleDict()
        self.hidden = hidden
        self._x: torch.Tensor | None = None

    def attach(self, source: nn.Module, target: nn.Module) -> None:
        # The source may also be a LinearPoint's linear: read its input before any (IA)3 scaling.
        self.handles.append(source.register_forward_pre_hook(self._capture, with_kwargs=True, prepend=True))
        self.handles.append(target.register_forward_hook(self._on_output))

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        route = self._route()
        needs = route is not None and any(
            getattr(self.adapters[n], "needs_input", False) for n in route.names if n in self.adapters)
        self._x = _first(args, kwargs) if needs else None

    def _on_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        route = self._route()
        x, self._x = self._x, None
        if route is None:
            return None
        h = output[0] if isinstance(output, tuple) else output
        if any(getattr(self.adapters[n], "post_norm", False) for n in route.names if n in self.adapters):
            new = route.dispatch(functools.partial(self._run_post_norm, module), x, h, args[0])
        else:
            new = route.dispatch(self._run, x, h)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def _run(self, setup: Setup, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        def leaf(name: str, h: torch.Tensor) -> torch.Tensor | None:
            module = self._leaf(name)
            return None if module is None else module(x, h)
        return fold(setup, h, leaf, self._fuse, weigh=self._weigh)

    def _run_post_norm(self, norm: nn.Module, setup: Setup, r: torch.Tensor, y: torch.Tensor,
                       s: torch.Tensor) -> torch.Tensor:
        """AdapterHub's post-norm placement at a LayerNorm ``y = LN(s)``, ``s = h + r``.

        The Stack folds adapter inputs ``t`` (from ``y``); the norm is applied again
        to ``t + r`` once, after the last adapter, as ``SeqBnConfig`` does.
        """
        ran: list[str] = []

        def leaf(name: str, t: torch.Tensor) -> torch.Tensor | None:
            module = self._leaf(name)
            if module is None:
                return None
            ran.append(name)
            return module.post_norm_step(t, r, s, y)
        t = fold(setup, y, leaf, self._fuse, weigh=self._weigh)
        if not ran:
            return y
        return F.layer_norm(t + r, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def _fuse(self, setup: Fuse, h: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
        if setup.key not in self.fusions:
            return h + sum(o - h for o in outs) / len(outs)
        return self.fusions[setup.key](h, outs)

    def add_fusion(self, key: str) -> None:
        if key not in self.fusions:  # made by set_active or a routed forward: frozen until
            self.fusions[key] = Fusion(self.hidden).requires_grad_(False)  # train_adapters(Fuse)


class LinearPoint(AdapterPoint):
    """LoRA, (IA)3 and BitFit modules on one ``nn.Linear``."""

    def attach(self, linear: nn.Linear) -> None:
        object.__setattr__(self, "linear", linear)
        self.handles.append(linear.register_forward_pre_hook(self._pre))
        # Linear adapters act inside the linear: whatever else reads its output (a sublayer
        # adapter on the same module, added before or after) sees the adapted output.
        self.handles.append(linear.register_forward_hook(self._post, prepend=True))

    def _pre(self, module: nn.Module, args: tuple) -> tuple | None:
        route = self._route()
        if route is None or not any(getattr(self.adapters[n], "has_input_transform", False)
                                    for n in route.names if n in self.adapters):
            return None
        return (route.dispatch(self._run_input, args[0]), *args[1:])

    def _run_input(self, setup: Setup, x: torch.Tensor) -> torch.Tensor:
        def leaf(name: str, x: torch.Tensor) -> torch.Tensor | None:
            module = self._leaf(name)
            if module is None or not module.has_input_transform:
                return None
            return module.transform_input(x)
        return fold(setup, x, leaf, weigh=self._weigh)

    def _post(self, module: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor | None:
        route = self._route()
        if route is None:
            return None
        return route.dispatch(self._run_output, args[0], y)

    def _run_output(self, setup: Setup, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def leaf(name: str, y: torch.Tensor) -> torch.Tensor | None:
            module = self._leaf(name)
            return None if module is None else module(x, y)
        return fold(setup, y, leaf, weigh=self._weigh)


class EmbedPoint(AdapterPoint):
    """Invertible adapters on a stack's token embeddings."""

    def attach(self, embed: nn.Module) -> None:
        self.handles.append(embed.register_forward_hook(self._post))

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        route = self._route()
        if route is None:
            return None
        h = output[0] if isinstance(output, tuple) else output
        new = route.dispatch(self._run, h)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def _run(self, setup: Setup, h: torch.Tensor) -> torch.Tensor:
        def leaf(name: str, h: torch.Tensor) -> torch.Tensor | None:
            module = self._leaf(name)
            return None if module is None else module(h)
        return fold(setup, h, leaf, weigh=self._weigh)


class OutputPoint(EmbedPoint):
    """The inverse invertible transform before the (tied) LM output projection."""

    def attach(self, projection: nn.Module) -> None:
        self.handles.append(projection.register_forward_pre_hook(self._pre))

    def _pre(self, module: nn.Module, args: tuple) -> tuple | None:
        route = self._route()
        if route is None:
            return None
        return (route.dispatch(self._run_inverse, args[0]), *args[1:])

    def _run_inverse(self, setup: Setup, z: torch.Tensor) -> torch.Tensor:
        def leaf(name: str, z: torch.Tensor) -> torch.Tensor | None:
            module = self._leaf(name)
            return None if module is None else module(z)
        return fold(setup, z, leaf, reverse=True, weigh=self._weigh)
