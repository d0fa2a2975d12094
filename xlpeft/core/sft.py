"""Sparse fine-tunings as named modules: θ + Σφ for one module call, never written into θ.

Configs and paper references: ``xlpeft.methods.sft`` (LT-SFT, Ansell et al. 2022).

    backbone parameter θ (one ``SparsePoint`` per parameter an SFT touches)
        pre-hook   take the model's SFT lock; SFTs of this call = those named in its
                   routes ─► module._parameters[attr] = θ.index_put(idx, θ[idx] + Σ values)
        forward    the module reads the effective tensor (autograd: grad reaches values)
        post-hook  (always called) put θ back, release the lock

Why this shape:

* **exact removal**: θ is never modified, so "remove" is by construction
  (bit-for-bit in every dtype). Entries are summed in float32 and rounded once
  into θ's dtype: in bf16 the effective weight is round(θ + Σφ), within bf16's
  unit roundoff (2⁻⁸·|θ + Σφ|, half an ulp) of the exact sum.
* **training**: only the K values are Parameters, so an optimizer holds state
  for K entries and every other parameter stays bit-identical.
* **threads**: the swap lives for one module call and is visible to any other
  thread running the same module, so every call of a hooked module, with or
  without SFTs, holds one re-entrant lock per model for its duration: calls of
  those modules are serialised across threads (the rest of the model is not).
* **activation checkpointing**: recomputation runs the module's hooks again
  under the saving call's frame (``core.routing``), so it sees the same SFTs.
* **routing**: the SFTs of a call come from its routes; every group of a routed
  call (per-example lists, ``BatchSplit``, encoder vs decoder) must name the same
  SFTs at each parameter, else a clear error (no silent mix). ``Fuse``/``Average``
  over an SFT are refused: SFTs compose by addition, i.e. in a ``Stack``.

* **merge** (``model.merge``): θ stores θ + Σφ with the K originals kept (last in, first
  out); a call naming exactly the merged SFTs then runs on θ as stored (no per-call copy),
  any other call rebuilds the unmerged θ first, so outputs stay bit-identical.

``torch.compile`` of a model with SFTs is not supported (the hooks take a lock).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from xlpeft.core.composition import Average, BatchSplit, Block, Fuse, Setup, leaves
from xlpeft.core.points import AdapterPoint
from xlpeft.core.routing import Route, Router
from xlpeft.errors import IncompatibleAdapterError, XlpeftTypeError, XlpeftValueError, unknown
from xlpeft.methods.sft import SparseFTConfig

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel

PREFIX = "sft-"


def is_sft(config: Any) -> bool:
    return bool(getattr(config, "sparse", False))


class ForwardLock:
    """A re-entrant lock that survives pickling and deepcopy (a copy gets a fresh lock)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.lock = threading.RLock()


class SparseDelta(nn.Module):
    """K entries of one parameter's difference: flat int64 ``indices`` (buffer), ``values`` (trained)."""

    def __init__(self, numel: int, k: int) -> None:
        super().__init__()
        self.numel = numel
        self.register_buffer("indices", torch.arange(k, dtype=torch.long))
        self.values = nn.Parameter(torch.zeros(k))

    def dense(self, like: torch.Tensor) -> torch.Tensor:
        """φ as a dense float32 tensor of ``like``'s shape (for reports and tests)."""
        out = torch.zeros(like.numel(), dtype=torch.float32, device=like.device)
        out[self.indices.to(like.device)] = self.values.detach().float().to(like.device)
        return out.view_as(like)


class SparsePoint(AdapterPoint):
    """Every SFT of one backbone parameter; hooks on each module holding it (tied weights too)."""

    def __init__(self, router: Router, stacks: tuple[str, ...], lock: ForwardLock) -> None:
        super().__init__(router, stacks)
        object.__setattr__(self, "lock", lock)
        self.held: dict[int, list[Any]] = {}  # thread id → parameters swapped out by this thread
        self.saved: dict[str, torch.Tensor] = {}  # merged SFT → θ at its entries before its merge

    def attach(self, *holders: tuple[nn.Module, str]) -> None:  # type: ignore[override]
        for module, attr in holders:
            self.handles.append(module.register_forward_pre_hook(functools.partial(self._pre, attr), prepend=True))
            self.handles.append(module.register_forward_hook(functools.partial(self._post, attr), always_call=True))

    # ------------------------------------------------------------------ which SFTs act
    def names(self) -> tuple[str, ...]:
        """The SFTs of this parameter the running call applies (sorted), checked across groups."""
        frame = self.router.frame()
        if frame is None:
            routes: Any = (self.router.active,)
        elif frame.disabled:
            return ()
        else:
            routes = frame.routes.values()
        found: tuple[str, ...] | None = None
        for route in routes:
            if route is None or not any(n in self.adapters for n in route.names):
                here = [()] if route is not None else []
            else:
                here = [tuple(sorted(n for n in leaves(s) if n in self.adapters)) for s in route.setups]
            for names in here:
                if found is None:
                    found = names
                elif names != found:
                    raise mixed_error(self.key, found, names)
        return found or ()

    # ------------------------------------------------------------------ hooks
    def _pre(self, attr: str, module: nn.Module, args: tuple) -> None:
        names = self.names()  # may raise: before the lock, nothing held
        self.check_trainable(names)
        self.lock.lock.acquire()
        theta = module._parameters[attr]
        try:
            if names != tuple(sorted(self.merged)):  # merged SFTs already in θ: nothing to do
                module._parameters[attr] = self.effective(self.pristine(theta), names)
        except BaseException:
            module._parameters[attr] = theta
            self.lock.lock.release()
            raise
        self.held.setdefault(threading.get_ident(), []).append((attr, theta))

    def _post(self, attr: str, module: nn.Module, args: tuple, output: Any) -> None:
        held = self.held.get(threading.get_ident())
        if not held:
            return None  # our pre-hook raised before taking anything
        name, theta = held.pop()
        module._parameters[name] = theta
        self.lock.lock.release()
        return None

    def check_trainable(self, names: tuple[str, ...]) -> None:
        trained = [n for n in self.merged if n in names and self.adapters[n].values.requires_grad]
        if trained:
            raise XlpeftValueError(f"SFT {trained[0]!r} is merged into the weights, so it cannot train; unmerge "
                                   "it first (model.unmerge) or freeze it")

    def pristine(self, theta: torch.Tensor) -> torch.Tensor:
        """θ without the merged SFTs (their saved entries put back, last merge first); θ itself if none."""
        if not self.merged:
            return theta
        flat = theta.reshape(-1)
        for name in reversed(self.merged):
            flat = flat.index_put((self.adapters[name].indices.to(flat.device),), self.saved[name].to(flat.device))
        return flat.view_as(theta)

    def effective(self, theta: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """θ with the named SFTs added (float32 sums, rounded once into θ's dtype); a new tensor."""
        if not names:
            return theta
        flat = theta.reshape(-1)
        deltas = [self.adapters[n] for n in names]
        idx = deltas[0].indices
        values = deltas[0].values.float()
        if len(deltas) > 1:
            idx = torch.cat([d.indices for d in deltas])
            values = torch.cat([d.values.float() for d in deltas])
            idx, inverse = torch.unique(idx, return_inverse=True)
            values = values.new_zeros(idx.shape[0]).index_add(0, inverse, values)
        idx = idx.to(flat.device)
        new = flat.index_select(0, idx).float() + values.to(flat.device)
        return flat.index_put((idx,), new.to(flat.dtype)).view_as(theta)


def mixed_error(where: str, a: tuple[str, ...], b: tuple[str, ...]) -> XlpeftValueError:
    return XlpeftValueError(
        f"one call can apply one set of sparse fine-tunings (SFTs) to a parameter; at {where} its groups "
        f"ask for {list(a)} and {list(b)}. SFTs change the weights for the whole batch: run one call per "
        "SFT set (e.g. per language), or route only adapters per example")


# ---------------------------------------------------------------------- setup checks
def sft_names(model: AdaptedModel) -> set[str]:
    return {n for n, c in model.configs.items() if is_sft(c)}


def check_setup(model: AdaptedModel, setup: Setup | None) -> None:
    """SFTs compose by addition: refuse them inside Fuse/Average, and a BatchSplit mixing SFT sets."""
    sfts = sft_names(model)
    if not sfts or setup is None or isinstance(setup, str):
        return
    for block in _blocks(setup):
        if isinstance(block, (Fuse, Average)):
            inside = [n for n in leaves(block) if n in sfts]
            if inside:
                raise XlpeftValueError(
                    f"{type(block).__name__} mixes adapter outputs; got the sparse fine-tuning(s) {inside} "
                    f"inside {block!r}. SFTs add to the weights: put them in a Stack, e.g. "
                    f"Stack({inside[0]!r}, {block!r})")
    if isinstance(setup, BatchSplit):
        check_groups(model, setup.children)


def _blocks(setup: Setup) -> list[Block]:
    if isinstance(setup, str):
        return []
    return [setup] + [b for c in setup.children for b in _blocks(c)]


def check_groups(model: AdaptedModel, setups: Any) -> None:
    """Every setup of one call must name the same SFTs (checked before the call runs)."""
    sfts = sft_names(model)
    if not sfts:
        return
    seen = None
    for setup in setups:
        names = tuple(sorted(n for n in leaves(setup) if n in sfts))
        if seen is None:
            seen = names
        elif names != seen:
            raise mixed_error("the model", seen, names)


def check_routes(model: AdaptedModel, routes: Mapping[str, Route | None] | None) -> None:
    if routes is not None:
        check_groups(model, [s for r in routes.values() if r is not None for s in r.setups])


# ---------------------------------------------------------------------- building
def parameters(model: AdaptedModel) -> dict[str, nn.Parameter]:
    """Backbone parameters by the names SFTs use: relative to the HF *base* model, heads after.

    A language SFT trained with an MLM head (``bert.encoder…`` in ``BertForMaskedLM``)
    then applies to the same backbone under a task head or none (``encoder…``);
    head parameters (``cls.predictions…``) keep their full names and exist only there.
    """
    base = getattr(model.model, "base_model", model.model)
    out = dict(base.named_parameters())
    seen = {id(p) for p in out.values()}
    for name, param in model.model.named_parameters():
        if id(param) not in seen:
            out[name] = param
    return out


def _holders(model: AdaptedModel, param: nn.Parameter) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) holding ``param`` (a tied embedding/decoder weight: two)."""
    return [(m, attr) for m in model.model.modules() for attr, p in m._parameters.items() if p is param]


def build(model: AdaptedModel, name: str, config: SparseFTConfig) -> int:
    """Attach SFT ``name``'s deltas (indices 0..K-1, values 0 until loaded); checked first."""
    params = parameters(model)
    for pname, numel in zip(config.params, config.numels):
        if pname not in params:
            raise unknown("backbone parameter", pname, params,
                          hint="An SFT names parameters as xlpeft.core.sft.parameters(model) does.")
        if params[pname].numel() != numel:
            raise IncompatibleAdapterError(
                f"SFT {name!r} was made for a backbone whose {pname} has {numel} entries; this one has "
                f"{params[pname].numel()}. Load it into the backbone it was trained with")
    lock = next((p.lock for p in model.points.values() if isinstance(p, SparsePoint)), None) or ForwardLock()
    for pname, k, numel in zip(config.params, config.counts, config.numels):
        key = PREFIX + pname.replace(".", "-")
        if key not in model.points:
            holders = _holders(model, params[pname])
            point = SparsePoint(model.state, tuple(model.backbone.stacks), lock)
            point.attach(*holders)
            point.key = pname
            model.points[key] = point
            model._anchors[key] = (holders[0][0],)
        model.points[key].adapters[name] = SparseDelta(numel, k)
        model._places.setdefault(name, {})[pname] = key
    model._place(name)
    return len(config.params)


def check_tensors(model: AdaptedModel, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Indices of an SFT: int64, inside their parameter, no repeats (before anything is copied)."""
    config = model.configs[name]
    for pname, numel in zip(config.params, config.numels):
        idx = tensors.get(f"{pname}.indices")
        if idx is None:
            continue  # the key check names it
        if idx.dtype != torch.long:
            raise XlpeftTypeError(f"SFT {name!r}: {pname}.indices can be int64; got {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise XlpeftValueError(f"SFT {name!r}: {pname}.indices can be 0..{numel - 1} (flat positions in the "
                                   f"parameter); got {int(idx.min())}..{int(idx.max())}")
        if torch.unique(idx).numel() != idx.numel():
            raise XlpeftValueError(f"SFT {name!r}: {pname}.indices names an entry twice; each entry once")


def add_sft(model: AdaptedModel, name: str, indices: Mapping[str, torch.Tensor],
            values: Mapping[str, torch.Tensor] | None = None, selection: str = "given") -> str:
    """A new SFT from flat indices (and values; zeros by default) per backbone parameter name."""
    if not isinstance(indices, Mapping) or not indices:
        raise XlpeftTypeError("`indices` can be a non-empty dict: backbone parameter name → flat int64 positions")
    params = parameters(model)
    for pname in indices:
        if pname not in params:
            raise unknown("backbone parameter", str(pname), params,
                          hint="An SFT names parameters as xlpeft.core.sft.parameters(model) does.")
    tensors: dict[str, torch.Tensor] = {}
    for pname in sorted(indices):
        idx = torch.as_tensor(indices[pname])
        if idx.dtype != torch.long:
            raise XlpeftTypeError(f"indices of {pname} can be int64 flat positions; got {idx.dtype}")
        idx = idx.reshape(-1).cpu()
        order = torch.argsort(idx)
        given = None if values is None else values.get(pname)
        val = torch.zeros(idx.numel()) if given is None else torch.as_tensor(given).detach().reshape(-1).cpu()
        if val.numel() != idx.numel():
            raise XlpeftValueError(f"{pname}: {idx.numel()} indices but {val.numel()} values; give one per index")
        tensors[f"{pname}.indices"], tensors[f"{pname}.values"] = idx[order], val[order].float()
    names = sorted(indices)
    config = SparseFTConfig(params=tuple(names), counts=tuple(tensors[f"{p}.indices"].numel() for p in names),
                            numels=tuple(params[p].numel() for p in names), selection=selection)
    model.add_adapter(name, config)
    try:
        model.load_adapter_state_dict(name, tensors)
    except BaseException:
        model.delete_adapter(name)
        raise
    return name


def theta_digest(model: AdaptedModel, name: str) -> str:
    """sha256 of θ at an SFT's entries: its file records which backbone *weights* it was trained on."""
    params = parameters(model)
    digest = hashlib.sha256()
    for pname, point in model.adapter_places(name).items():
        idx = point.adapters[name].indices
        theta = point.pristine(params[pname].detach()).reshape(-1)
        digest.update(theta.index_select(0, idx.to(theta.device)).float().cpu().numpy().tobytes())
    return digest.hexdigest()


def deltas(model: AdaptedModel, name: str) -> dict[str, torch.Tensor]:
    """φ of SFT ``name`` as dense float32 tensors per parameter name."""
    params = parameters(model)
    return {p: point.adapters[name].dense(params[p]) for p, point in model.adapter_places(name).items()}



@torch.no_grad()
def merge_and_unload(model: AdaptedModel, name: str) -> None:
    """Write SFT ``name`` into the backbone for good (θ ← round(θ + φ)) and delete it.

    For deployment and export (``save_merged`` then writes a plain model). It cannot be
    undone: the SFT is gone and other SFTs' files, recorded against the old θ, are
    refused by the weight check (``verify=False`` applies them anyway).
    """
    model.require_adapters(name)
    if not is_sft(model.configs[name]):
        raise XlpeftValueError(f"{name!r} is a {model.configs[name].method} adapter; this merges SFTs "
                               "(model.merge_and_unload merges linear adapters)")
    if is_merged(model, name):
        unmerge(model, name)
    params = parameters(model)
    for pname, point in model.adapter_places(name).items():
        if point.merged:
            raise XlpeftValueError(f"{pname} holds merged SFTs {point.merged}; unmerge them first, or "
                                   "merge_and_unload them in turn")
        flat = params[pname].data.view(-1)
        flat.copy_(point.effective(flat, (name,)))
    model.delete_adapter(name)


# ---------------------------------------------------------------------- reversible merge
def is_merged(model: AdaptedModel, name: str) -> bool:
    return any(name in point.merged for point in model.adapter_places(name).values())


@torch.no_grad()
def merge(model: AdaptedModel, name: str) -> None:
    """Write SFT ``name`` into θ (its K originals kept): calls whose SFTs are exactly the merged
    ones then run on θ as stored, with no per-call copy; any other call (other SFTs, none,
    ``disable_adapters``, routed) rebuilds the unmerged θ first, so results are bit-identical
    to the unmerged SFT. Its values are frozen while merged. ``unmerge``: last in, first out."""
    model.require_adapters(name)
    if is_merged(model, name):
        raise XlpeftValueError(f"SFT {name!r} is merged already; unmerge it first")
    params = parameters(model)
    places = model.adapter_places(name)
    for pname, point in places.items():
        flat = params[pname].data.view(-1)
        idx = point.adapters[name].indices.to(flat.device)
        point.saved[name] = flat.index_select(0, idx).clone()
        merged = tuple(sorted((*point.merged, name)))
        flat.copy_(point.effective(point.pristine(flat), merged))
        point.merged.append(name)
    for module in model.adapter_modules(name):
        module.requires_grad_(False)


@torch.no_grad()
def unmerge(model: AdaptedModel, name: str) -> None:
    """Put θ back exactly at SFT ``name``'s entries; refused unless it is the last merge everywhere."""
    places = model.adapter_places(name)
    late = [p for p, point in places.items() if not point.merged or point.merged[-1] != name]
    if late:
        raise XlpeftValueError(f"SFT {name!r} is not the last merge at {late[0]} (merged there: "
                               f"{places[late[0]].merged}); unmerge the later ones first (last in, first out)")
    params = parameters(model)
    for pname, point in places.items():
        flat = params[pname].data.view(-1)
        flat.index_copy_(0, point.adapters[name].indices.to(flat.device), point.saved.pop(name).to(flat.dtype))
        point.merged.pop()
