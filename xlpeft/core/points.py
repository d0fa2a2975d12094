"""Adapter points: the places in a backbone where named adapters act.

A point owns the modules of every adapter attached at one place (a
``ModuleDict`` keyed by adapter name) and the hooks on the backbone modules
that call them. Each kind has its own algebra for the composition blocks:

    sublayer   h ─► Stack: fold · Average: h + Σ w(aᵢ(h) − h) · Fuse: fusion
    linear     y = W·T_in(x) ─► Stack: fold T_out · Average: y + Σ w(Tᵢ(x, y) − y)
    embed      e ─► invertible forward, in Stack order
    lm_output  z ─► invertible inverse, in reverse Stack order

Routing (which setup runs for which example) comes from the running call's
``Frame`` (``core.routing``); points never compute groups themselves and keep
nothing of a call on the module. An ``Average``'s weights ``w`` are its own,
or, while a weight provider is set for it (``AdaptedModel.set_average_weights``
or ``average_weights``), a vector per point from that provider.

The point protocol (``Point``), shared by sublayer, linear, embedding, output,
attention (prefix), prompt and vocabulary points:

    router      the model's ``Router`` (a reference, not a child module)
    stacks      the stacks this point acts in (``("encoder",)``)
    key         its place key (``encoder.0.ffn``): names it to weight providers
    attach(*modules)   register its hooks on backbone modules
    remove_hooks()     take them off again (the backbone is as before)
    _route()    the running call's route if this point acts now, else None
    _acts(route)       whether anything of this point runs for ``route``
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.core import batched
from xlpeft.core.composition import Average, Fuse, Setup, Stack
from xlpeft.methods.fusion import Fusion
from xlpeft.methods.ia3 import IA3
from xlpeft.core.routing import Route, Router

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


def _always(module: nn.Module) -> bool:
    return True


def _scales_input(module: nn.Module) -> bool:
    return getattr(module, "has_input_transform", False)


def _acts_on_output(module: nn.Module) -> bool:
    """False for an input-scaling (IA)3, whose output step is the identity."""
    return not (isinstance(module, IA3) and module.has_input_transform)


def _first(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class Point(nn.Module):
    """The protocol of every point (see the module docstring): hooks read the call's frame."""

    def __init__(self, router: Router, stacks: tuple[str, ...]) -> None:
        super().__init__()
        object.__setattr__(self, "router", router)
        self.stacks = stacks
        self.handles: list[Any] = []
        self.key = ""  # the place key (``encoder.0.ffn``), set by the model: names this point to providers

    def attach(self, *modules: nn.Module) -> None:
        raise NotImplementedError

    def _acts(self, route: Route) -> bool:
        return True

    def _route(self) -> Route | None:
        """The route if this point may act now (its stack runs, it has something to do), else None."""
        frame = self.router.frame()
        if frame is None:  # a hooked module called outside any stack and call: the active setup
            route = self.router.active
        elif frame.stack not in self.stacks:
            return None
        else:
            route = frame.route()
        return route if route is not None and self._acts(route) else None

    def _weigh(self, setup: Average) -> Sequence[float] | torch.Tensor:
        """``setup``'s child weights at this point (its own unless a provider is set)."""
        frame = self.router.frame() or self.router.open()
        return frame.average_weights(setup, self)

    def _keep(self, value: torch.Tensor | None) -> None:
        """Keep ``value`` for this point's next hook in this call (never on the module)."""
        frame = self.router.frame()
        if frame is not None:
            frame.captures[id(self)] = value

    def _take(self) -> torch.Tensor | None:
        frame = self.router.frame()
        return None if frame is None else frame.captures.pop(id(self), None)

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class AdapterPoint(Point):
    """Base of the adapter points: the adapters at one place, keyed by name."""

    def __init__(self, router: Router, stacks: tuple[str, ...]) -> None:
        super().__init__(router, stacks)
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []  # this place's merge stack, oldest first (kept by core.merging)

    def _acts(self, route: Route) -> bool:
        here = [n for n in route.names if n in self.adapters]
        return any(n not in self.merged for n in here)

    def _leaf(self, name: str) -> nn.Module | None:
        if name in self.merged or name not in self.adapters:
            return None
        return self.adapters[name]

    def _plan(self, route: Route, kernels: dict, keep: Callable[[nn.Module], bool]) -> list | None:
        """``batched.plan`` for this route, kept per setups while the modules it names stay the same.

        The key holds the module (or None: absent, merged) behind every name, so adding,
        removing, replacing or merging an adapter makes a new plan; a plan keeps modules,
        never tensors, so weights are read afresh on every call.
        """
        if torch.compiler.is_compiling():  # traced once per graph: nothing to keep
            return batched.plan(route.setups, self._leaf, keep, kernels)
        plans = self.__dict__.setdefault("_plans", {})
        key = (route.setups, id(kernels))
        modules = tuple(self._leaf(n) for n in route.names)
        kept = plans.get(key)
        if kept is not None and len(kept[0]) == len(modules) and all(a is b for a, b in zip(kept[0], modules)):
            return kept[1]
        steps = batched.plan(route.setups, self._leaf, keep, kernels)
        if len(plans) >= 64:  # many distinct mixes: start afresh rather than grow
            plans.clear()
        plans[key] = (modules, steps)
        return steps

    def _batched(self, route: Route, kernels: dict, direct: Callable, keep: Callable[[nn.Module], bool],
                 *tensors: torch.Tensor | None) -> torch.Tensor | None:
        """A grouped route as one batched computation (``core.batched``); None: use the loop."""
        if not route.grouped or not self.router.batched:
            return None
        steps = self._plan(route, kernels, keep)
        if steps is None:
            return None
        last = tensors[-1]
        gid = route.group_ids(last.shape[0], last.device)
        return batched.run(steps, gid, tensors, direct, kernels)


class SublayerPoint(AdapterPoint):
    """Bottleneck-style adapters at a sublayer output (input captured for parallel)."""

    def __init__(self, router: Router, stacks: tuple[str, ...], hidden: int) -> None:
        super().__init__(router, stacks)
        self.fusions = nn.ModuleDict()
        self.hidden = hidden

    def attach(self, source: nn.Module, target: nn.Module) -> None:
        # The source may also be a LinearPoint's linear: read its input before any (IA)3 scaling.
        self.handles.append(source.register_forward_pre_hook(self._capture, with_kwargs=True, prepend=True))
        self.handles.append(target.register_forward_hook(self._on_output))

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        route = self._route()
        needs = route is not None and any(
            getattr(self.adapters[n], "needs_input", False) for n in route.names if n in self.adapters)
        self._keep(_first(args, kwargs) if needs else None)

    def _on_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        route = self._route()
        x = self._take()
        if route is None:
            return None
        h = output[0] if isinstance(output, tuple) else output
        if any(getattr(self.adapters[n], "post_norm", False) for n in route.names if n in self.adapters):
            steps = self._plan(route, batched.POST_NORM, _always) if self.router.batched and route.grouped else None
            if steps is not None:
                gid = route.group_ids(h.shape[0], h.device)
                new = batched.run_post_norm(steps, gid, module, x, h, args[0])
            else:
                new = route.dispatch(functools.partial(self._run_post_norm, module), x, h, args[0])
        else:
            new = self._batched(route, batched.SUBLAYER, lambda m, h: m(x, h), _always, x, h)
            if new is None:
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

        As AdapterHub's ``Stack`` over ``SeqBnConfig`` adapters: each adapter reads
        ``LN(o + r)`` of the previous adapter's output ``o`` (``h`` for the first) and
        keeps its residual; the norm is applied once more to ``o + r`` after the last.
        """
        ran: list[str] = []

        def leaf(name: str, o: torch.Tensor) -> torch.Tensor | None:
            module = self._leaf(name)
            if module is None:
                return None
            ran.append(name)
            return module.post_norm_step(o, r, norm)
        o = fold(setup, s - r, leaf, self._fuse, weigh=self._weigh)  # the stream before the norm, from h
        if not ran:
            return y
        return F.layer_norm(o + r, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def _fuse(self, setup: Fuse, h: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
        if setup.key not in self.fusions:
            return h + sum(o - h for o in outs) / len(outs)
        return self.fusions[setup.key](h, outs)

    def add_fusion(self, key: str) -> None:
        if key not in self.fusions:  # made by set_active or a routed forward: frozen until
            self.fusions[key] = Fusion(self.hidden).requires_grad_(False)  # train_adapters(Fuse)


class LinearAdapters(nn.ModuleDict):
    """A linear point's adapters: a module with ``bind(linear)`` gets the point's linear when set.

    Methods that read the frozen weight (DoRA's column norm) need the linear,
    which ``forward(x, y)`` does not pass; ``bind`` runs before the module is
    stored, so a refusal stores nothing.
    """

    def __setitem__(self, key: str, module: nn.Module) -> None:
        bind = getattr(module, "bind", None)
        linear = self.__dict__.get("_linear")
        if bind is not None and linear is not None:
            bind(linear)
        super().__setitem__(key, module)


class LinearPoint(AdapterPoint):
    """LoRA, (IA)3, BitFit, DoRA, VeRA, LoHa and LoKr modules on one ``nn.Linear``.

    Protocol extension: a module that defines ``bind(linear)`` is given this
    point's linear when it is attached (and by ``bind`` on a fresh rebuild);
    it keeps a reference, never a child.
    """

    def __init__(self, router: Router, stacks: tuple[str, ...]) -> None:
        super().__init__(router, stacks)
        self.adapters = LinearAdapters()

    def bind(self, module: nn.Module) -> None:
        """Give ``module`` this point's linear if it asks for it (``module.bind(linear)``)."""
        bind = getattr(module, "bind", None)
        if bind is not None:
            bind(self.linear)

    def attach(self, linear: nn.Linear) -> None:
        object.__setattr__(self, "linear", linear)
        object.__setattr__(self.adapters, "_linear", linear)
        self.handles.append(linear.register_forward_pre_hook(self._pre))
        # Linear adapters act inside the linear: whatever else reads its output (a sublayer
        # adapter on the same module, added before or after) sees the adapted output.
        self.handles.append(linear.register_forward_hook(self._post, prepend=True))

    def _pre(self, module: nn.Module, args: tuple) -> tuple | None:
        route = self._route()
        if route is None or not any(getattr(self.adapters[n], "has_input_transform", False)
                                    for n in route.names if n in self.adapters):
            return None
        x = args[0]
        new = self._batched(route, batched.LINEAR_INPUT, lambda m, x: m.transform_input(x), _scales_input, x)
        return (route.dispatch(self._run_input, x) if new is None else new, *args[1:])

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
        x = args[0]
        new = self._batched(route, batched.LINEAR_OUTPUT, lambda m, y: m(x, y), _acts_on_output, x, y)
        return route.dispatch(self._run_output, x, y) if new is None else new

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
