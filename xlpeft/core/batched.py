"""Batched routed computation: the adapters of one point run as one operation.

A routed batch gives every row a group (``Route.group_ids``) and every group a
setup. Instead of permuting the batch, running each group's adapter on its
slice and concatenating (``Route.dispatch``, the per-group loop), a point asks
``plan`` for one *step* per Stack depth: the module each group runs there. A
step whose groups all run one module calls it on the whole batch; a step over
different modules of one kind stacks their weights and gathers them per row
(slot of row b = slot of its group), so one ``bmm`` serves every adapter:

    rows b ─► group gid[b] ─► slot[gid[b]] ─► W[slot]           (S stacked adapters + identity)
    bottleneck   h + s·up(f(down(src)))        src [B, T, H] ⨯ W_down[slot]ᵀ  (bmm)
    LoRA         y + s·(x A[slot]ᵀ) B[slot]ᵀ   ranks zero-padded to the largest
    (IA)3        y ⊙ l[slot]  /  x ⊙ l[slot]
    prefix       K, V, bias of the G setups stacked once, gathered per row

Every shape is static and the routing is a tensor, so ``torch.compile`` keeps
one graph for every mix of the same setups. Stacks are rebuilt with
``torch.stack`` on every call: parameters are shared tensors, so the stack
follows every optimiser step and gradients flow back to each adapter's own
parameters (only the rows that used it contribute). ``scripts/bench_routed.py``
measures what the stacking costs.

What batches: groups whose setups are adapter names or ``Stack``s of names (post-norm
(SeqBn) bottleneck Stacks too, one LayerNorm step per depth).
The per-group loop stays for the rest (``plan`` returns None): an ``Average``
or ``Fuse`` acting at the point, one Stack depth mixing modules of different
kinds or shapes (LoRA in one group, (IA)3 in another), kinds without a kernel
here (gated adapters, DoRA, VeRA, LoHa, LoKr, Compacter, BitFit, generated
adapters, invertible adapters, gated prefixes),
LoRA with different dropout rates, and adapters whose weights are FSDP shards
at that moment (each adapter wrapped as its own unit). A step where every group runs the same
module calls that module, whatever its kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.core.composition import Setup, Stack, leaves
from xlpeft.core.sharding import is_sharded
from xlpeft.methods.bottleneck import Bottleneck
from xlpeft.methods.ia3 import IA3
from xlpeft.methods.lora import LoRA

Step = tuple[nn.Module | None, ...]
"""The module each group runs at one Stack depth (None: nothing, the identity)."""
Leaf = Callable[[str], nn.Module | None]


# --------------------------------------------------------------------------- planning
# Plain loops and lists only: dynamo traces this code in compiled models (no generators).
def _present(names: Sequence[Setup], leaf: Leaf, keep: Callable[[nn.Module], bool]) -> list[nn.Module]:
    out = []
    for name in names:
        module = leaf(name)
        if module is not None and keep(module):
            out.append(module)
    return out


def _chain(setup: Setup, leaf: Leaf, keep: Callable[[nn.Module], bool]) -> list[nn.Module] | None:
    """The modules ``setup`` runs here, in order; None if it cannot be a chain (Average, Fuse)."""
    if isinstance(setup, str):
        return _present([setup], leaf, keep)
    if isinstance(setup, Stack) and all([isinstance(c, str) for c in setup.children]):
        return _present(setup.children, leaf, keep)
    # a block with its own algebra: a chain only if none of its adapters acts here
    return None if _present(leaves(setup), leaf, keep) else []


def plan(setups: Sequence[Setup], leaf: Leaf, keep: Callable[[nn.Module], bool],
         kernels: dict[type, Callable]) -> list[Step] | None:
    """One step per Stack depth, or None where the per-group loop must run."""
    chains = []
    depth = 0
    for setup in setups:
        chain = _chain(setup, leaf, keep)
        if chain is None:
            return None
        chains.append(chain)
        depth = max(depth, len(chain))
    steps = []
    for j in range(depth):
        step = tuple([c[j] if j < len(c) else None for c in chains])
        if not _uniform(step) and not _batchable(step, kernels):
            return None
        steps.append(step)
    return steps


def _uniform(step: Step) -> bool:
    """Every group runs the same module (none runs the identity)."""
    return step[0] is not None and all([m is step[0] for m in step])


def _batchable(step: Step, kernels: dict[type, Callable]) -> bool:
    """Whether the step's modules share a kind with a kernel and a compatibility key."""
    mods = [m for m in step if m is not None]
    kind = type(mods[0])
    if kind not in kernels or not all([type(m) is kind for m in mods]):
        return False
    keys = [_KEYS[kind](m) for m in mods]
    if keys[0] is None or not all([k == keys[0] for k in keys]):
        return False
    # weights read outside their module's forward must be whole here (not FSDP shards of a per-adapter unit)
    return torch.compiler.is_compiling() or not any([is_sharded(m) for m in mods])


def _bottleneck_key(m: Bottleneck) -> tuple | None:
    if m.gate is not None:
        return None
    w = m.down.weight
    return ("bn", m.parallel, m.post_norm, m.residual_before_ln, repr(m.act), w.shape[1], m.up.weight.shape[0],
            w.dtype, w.device, m.down.bias is not None, m.up.bias is not None)


def _lora_key(m: LoRA) -> tuple | None:
    if m.gate is not None:
        return None
    a, b = m.lora_A.weight, m.lora_B.weight
    return ("lora", a.shape[1], b.shape[0], a.dtype, a.device, float(getattr(m.dropout, "p", 0.0)))


def _ia3_key(m: IA3) -> tuple:
    return ("ia3", m.has_input_transform, m.ia3_l.shape, m.ia3_l.dtype, m.ia3_l.device)


_KEYS: dict[type, Callable[[nn.Module], tuple | None]] = {
    Bottleneck: _bottleneck_key, LoRA: _lora_key, IA3: _ia3_key}


# --------------------------------------------------------------------------- running
def run(steps: list[Step], gid: torch.Tensor, tensors: Sequence[torch.Tensor | None],
        direct: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        kernels: dict[type, Callable]) -> torch.Tensor:
    """Apply ``steps`` to ``tensors[-1]`` (the one being adapted); ``tensors[:-1]`` are read only."""
    *reads, h = tensors
    for step in steps:
        if _uniform(step):
            h = direct(step[0], h)
            continue
        mods, slot_of = _slots(step)
        if slot_of == list(range(len(step))):  # every group its own adapter: slots are group ids
            slots = gid
        else:
            slots = torch.tensor(slot_of, dtype=torch.long, device=gid.device).index_select(0, gid)
        identity = len(mods) in slot_of
        h = kernels[type(mods[0])](mods, slots, identity, *reads, h)
    return h


def _slots(step: Step) -> tuple[list[nn.Module], list[int]]:
    """The distinct modules of a step and each group's slot (identity: one past the last)."""
    mods: list[nn.Module] = []
    for m in step:
        if m is not None and not any([m is k for k in mods]):
            mods.append(m)
    slot_of = []
    for m in step:
        slot = len(mods)
        for i, k in enumerate(mods):
            if k is m:
                slot = i
        slot_of.append(slot)
    return mods, slot_of


def _stack(tensors: list[torch.Tensor], identity: float | None, dim: int | None = None,
           size: int | None = None) -> torch.Tensor:
    """``[S (+ 1), ...]``: the tensors (zero-padded along ``dim`` to ``size``), then an identity
    slot filled with ``identity`` unless it is None (no group runs the identity)."""
    if dim is not None:
        tensors = [_pad(t, dim, size) for t in tensors]
    out = torch.stack(tensors)
    return out if identity is None else torch.cat([out, torch.full_like(out[:1], identity)])


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, missing]
    return F.pad(t, pad)


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, rest…, F]`` as ``[B, N, F]`` in ``dtype`` (the adapters' own, as their boundary casts)."""
    return t.reshape(t.shape[0], -1, t.shape[-1]).to(dtype)


def _scales(mods: list[nn.Module], slots: torch.Tensor, ref: torch.Tensor) -> torch.Tensor | float:
    """Each row's scale ``s`` (one float where all adapters share it; identity rows add zeros)."""
    values = [float(m.scaling) for m in mods]
    if all([v == values[0] for v in values]):
        return values[0]
    return torch.tensor(values + [0.0], dtype=ref.dtype, device=ref.device).index_select(0, slots)[:, None, None]


def _delta(mods: list[Bottleneck], slots: torch.Tensor, identity: bool, src: torch.Tensor) -> torch.Tensor:
    """``s·up(f(down(src)))`` per row ``[B, N, H]`` in the adapters' dtype; padded widths add zeros."""
    width = max([m.down.weight.shape[0] for m in mods])
    zero = 0.0 if identity else None
    w_down = _stack([m.down.effective_weight() for m in mods], zero, 0, width).index_select(0, slots)
    w_up = _stack([m.up.effective_weight() for m in mods], zero, 1, width).index_select(0, slots)
    src = _rows(src, w_down.dtype)
    if mods[0].down.bias is not None:
        b = _stack([m.down.bias for m in mods], zero, 0, width).index_select(0, slots)[:, None]
        z = torch.baddbmm(b, src, w_down.transpose(1, 2))
    else:
        z = torch.bmm(src, w_down.transpose(1, 2))
    z = mods[0].act(z)  # f(0) = 0 for every activation offered: padded units stay zero
    if mods[0].up.bias is not None:
        b = _stack([m.up.bias for m in mods], zero).index_select(0, slots)[:, None]
        delta = torch.baddbmm(b, z, w_up.transpose(1, 2))
    else:
        delta = torch.bmm(z, w_up.transpose(1, 2))
    scale = _scales(mods, slots, delta)
    return delta if isinstance(scale, float) and scale == 1.0 else scale * delta


def bottleneck(mods: list[Bottleneck], slots: torch.Tensor, identity: bool, x: torch.Tensor | None,
               h: torch.Tensor) -> torch.Tensor:
    """``h + s·up(f(down(src)))`` per row, src = x (parallel) or h."""
    delta = _delta(mods, slots, identity, x if mods[0].parallel else h)
    return (_rows(h, delta.dtype) + delta).reshape(h.shape).to(h.dtype)


def post_norm(mods: list[Bottleneck], slots: torch.Tensor, identity: bool, r: torch.Tensor,
              norm: nn.Module, o: torch.Tensor) -> torch.Tensor:
    """One step of post-norm (SeqBn) Stacks per row, as ``Bottleneck.post_norm_step``.

    ``res + delta(LN(o + r))``; rows of the identity slot keep ``o``.
    """
    t = F.layer_norm(o + r, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    residual = {True: o, False: t, "post_add": o + r}[mods[0].residual_before_ln]
    delta = _delta(mods, slots, identity, t)
    out = (_rows(residual, delta.dtype) + delta).reshape(o.shape).to(o.dtype)
    if identity:
        keep = (slots == len(mods)).reshape(-1, *[1] * (o.dim() - 1))
        out = torch.where(keep, o, out)
    return out


def run_post_norm(steps: list[Step], gid: torch.Tensor, norm: nn.Module, r: torch.Tensor, y: torch.Tensor,
                  s: torch.Tensor) -> torch.Tensor:
    """Post-norm Stacks at a LayerNorm ``y = LN(s)``, ``s = h + r``, batched per depth.

    Every step updates the stream ``o`` (from ``h = s − r``); the norm is applied once
    more to ``o + r`` after the last, on the rows whose setup ran an adapter here
    (the others keep ``y``), as ``SublayerPoint._run_post_norm``.
    """
    o = s - r
    for step in steps:
        if _uniform(step):  # one module for every group: its own step, whatever its kind
            o = step[0].post_norm_step(o, r, norm)
            continue
        mods, slot_of = _slots(step)
        slots = torch.tensor(slot_of, dtype=torch.long, device=gid.device).index_select(0, gid)
        o = post_norm(mods, slots, len(mods) in slot_of, r, norm, o)
    out = F.layer_norm(o + r, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    ran = [any([step[g] is not None for step in steps]) for g in range(len(steps[0]))] if steps else []
    if all(ran) and ran:
        return out
    if not any(ran):
        return y
    rows = torch.tensor(ran, device=gid.device).index_select(0, gid).reshape(-1, *[1] * (y.dim() - 1))
    return torch.where(rows, out, y)


def lora(mods: list[LoRA], slots: torch.Tensor, identity: bool, x: torch.Tensor,
         y: torch.Tensor) -> torch.Tensor:
    """``y + s·(dropout(x) Aᵀ) Bᵀ`` per row; ranks zero-padded to the largest."""
    rank = max([m.lora_A.weight.shape[0] for m in mods])
    zero = 0.0 if identity else None
    a = _stack([m.lora_A.effective_weight() for m in mods], zero, 0, rank).index_select(0, slots)
    b = _stack([m.lora_B.effective_weight() for m in mods], zero, 1, rank).index_select(0, slots)
    dtype = a.dtype
    z = torch.bmm(mods[0].dropout(_rows(x, dtype)), a.transpose(1, 2))
    scale = _scales(mods, slots, z)
    if isinstance(scale, float):
        out = torch.baddbmm(_rows(y, dtype), z, b.transpose(1, 2), alpha=scale)
    else:
        out = torch.baddbmm(_rows(y, dtype), z * scale, b.transpose(1, 2))
    return out.reshape(y.shape).to(y.dtype)


def ia3_output(mods: list[IA3], slots: torch.Tensor, identity: bool, x: torch.Tensor,
               y: torch.Tensor) -> torch.Tensor:
    """``y ⊙ l`` per row."""
    scale = _stack([m.ia3_l for m in mods], 1.0 if identity else None).index_select(0, slots)[:, None]
    return (_rows(y, scale.dtype) * scale).reshape(y.shape).to(y.dtype)


def ia3_input(mods: list[IA3], slots: torch.Tensor, identity: bool, x: torch.Tensor) -> torch.Tensor:
    """``x ⊙ l`` per row, in x's dtype (as ``IA3.transform_input``)."""
    ones = 1.0 if identity else None
    scale = _stack([m.ia3_l for m in mods], ones).index_select(0, slots)[:, None].to(x.dtype)
    return (_rows(x, x.dtype) * scale).reshape(x.shape)


SUBLAYER = {Bottleneck: bottleneck}
POST_NORM = {Bottleneck: post_norm}
LINEAR_OUTPUT = {LoRA: lora, IA3: ia3_output}
LINEAR_INPUT = {IA3: ia3_input}


# --------------------------------------------------------------------------- prefix
Segment = Callable[[Setup], tuple[torch.Tensor, torch.Tensor] | None]


def prefix(setups: Sequence[Setup], gid: torch.Tensor, segment: Segment, length: int,
           query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values ``[B, heads, L, d]`` and bias ``[B, 1, q, L]`` gathered from the G setups.

    ``segment(setup)`` gives an ungated setup's keys and values ``[heads, P, d]``
    (None: no prefix); each is zero-padded to ``length`` and masked out there.
    """
    n, heads, q_len, d = query.shape
    keys, values, lengths = [], [], []
    for setup in setups:
        seg = segment(setup)
        k, v = seg if seg is not None else (query.new_zeros(heads, 0, d),) * 2
        keys.append(_pad(k, 1, length))
        values.append(_pad(v, 1, length))
        lengths.append(k.shape[1])
    low = torch.finfo(query.dtype).min
    bias = torch.tensor([[0.0] * p + [low] * (length - p) for p in lengths],
                        dtype=query.dtype, device=query.device)
    return (torch.stack(keys)[gid], torch.stack(values)[gid],
            bias[gid][:, None, None, :].expand(n, 1, q_len, length))
