"""Choosing an SFT's support: LT-SFT's top-K |Δθ|, FishMask's top-K Fisher, DiffPruning's L0 gates.

References and the picture: ``xlpeft.methods.sft``. Every function here works
on an ``AdaptedModel`` through its public API and returns flat int64 indices
(and values) per backbone parameter name, which ``AdaptedModel.add_sft`` turns
into a named SFT saved like an adapter.

    eligible(model, support)          name → parameter, by include/exclude regexes
    budget(model, support, n)         K: a count, a density or "as many as <preset>"
    top_k({name: score}, k)           the K largest scores over all parameters together
    lt_sft_indices(model, before, k)  top-K of |θ_now − θ_before|  (LT-SFT after phase 1)
    fisher(model, batches, loss_fn)   Σ_batches g²  (FishMask's empirical Fisher)
    diff_pruning(model, batches, …)   trains θ + z ⊙ w with a hard-concrete L0 gate z
    combine_sfts(model, name, {a: c})  Σ c·φ over the union of the supports (SFT arithmetic)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from xlpeft.core.sft import parameters
from xlpeft.errors import XlpeftValueError
from xlpeft.methods.sft import LAYER_NORM, SupportConfig

Loss = Callable[[Any, Any], torch.Tensor]  # loss_fn(model, batch) -> scalar loss
PROBE = "sft_budget_probe"


def eligible(model: Any, support: SupportConfig) -> dict[str, nn.Parameter]:
    """The backbone parameters an SFT may change, by their SFT names (``xlpeft.core.sft.parameters``)."""
    out = {}
    for name, param in parameters(model).items():
        if not param.is_floating_point() or not any(re.search(p, name) for p in support.include):
            continue
        if any(re.search(p, name) for p in support.exclude):
            continue
        if not support.layer_norm and re.search(LAYER_NORM, name):
            continue
        out[name] = param
    if not out:
        raise XlpeftValueError(f"no backbone parameter is eligible for the SFT: include {list(support.include)}, "
                               f"exclude {list(support.exclude)}; widen `include` or narrow `exclude`")
    return out


def adapter_size(model: Any, preset: str | Any) -> int:
    """Parameters adapter ``preset`` would have on this model (added, counted, deleted)."""
    model.add_adapter(PROBE, preset)
    try:
        return sum(p.numel() for m in model.adapter_modules(PROBE) for p in m.parameters())
    finally:
        model.delete_adapter(PROBE)


def budget(model: Any, support: SupportConfig, available: int) -> int:
    """K for ``support`` among ``available`` eligible entries; refuses K > available."""
    if support.count:
        k, why = support.count, f"count={support.count}"
    elif support.density:
        k, why = max(1, round(support.density * available)), f"density={support.density}"
    elif support.like:
        k, why = adapter_size(model, support.like), f"like={support.like!r}"
    else:
        raise XlpeftValueError("this selection needs K: set `count`, `density` or `like` (e.g. 'madx-language')")
    if k > available:
        raise XlpeftValueError(f"K={k} ({why}) is larger than the {available} eligible entries; lower K or "
                               "widen the eligible parameters (`include`, `exclude`, `layer_norm`)")
    return k


def top_k(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Flat indices (sorted, int64) of the ``k`` largest scores over all tensors together.

    Parameters with no kept entry are left out. Ties are broken by ``torch.topk``.
    """
    names = list(scores)
    total = sum(scores[n].numel() for n in names)
    if not 0 < k <= total:
        raise XlpeftValueError(f"K can be 1..{total} (the eligible entries); got {k}")
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
    chosen = torch.topk(flat, k, sorted=False).indices.sort().values
    out, start = {}, 0
    for name in names:
        stop = start + scores[name].numel()
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, stop]))
        if hi > lo:
            out[name] = chosen[lo:hi] - start
        start = stop
    return out


def snapshot(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of ``params`` (θ before phase 1)."""
    return {n: p.detach().clone() for n, p in params.items()}


def lt_sft_indices(model: Any, before: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """LT-SFT's support after phase 1: the K entries with the largest |θ_now − θ_before|."""
    params = parameters(model)
    return top_k({n: (params[n].detach().float() - b.float()).abs() for n, b in before.items()}, k)


@torch.no_grad()
def reset(model: Any, before: Mapping[str, torch.Tensor]) -> None:
    """Put θ back to ``before`` (LT-SFT between the phases), bit for bit."""
    params = parameters(model)
    for name, value in before.items():
        params[name].copy_(value)


def fisher(model: Any, batches: Iterable[Any], loss_fn: Loss,
           params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """FishMask's empirical Fisher: Σ over batches of the squared gradient of each batch's loss.

    Batches of one example give Sung et al.'s per-example estimate; larger batches
    square the batch-mean gradient (cheaper, coarser). ``requires_grad`` is restored.
    """
    flags = {n: p.requires_grad for n, p in params.items()}
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        seen = 0
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), grads):
                if g is not None:
                    scores[name] += g.detach().float() ** 2
            seen += 1
        if not seen:
            raise XlpeftValueError("FishMask needs at least one batch to estimate the Fisher information; got none")
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    return scores


# ---------------------------------------------------------------------- DiffPruning
GAMMA, ZETA, BETA = -1.5, 1.5, 1.0
"""Hard-concrete stretch (γ, ζ) and temperature β (Louizos et al. 2018's gate, Guo et al.'s stretch)."""


def hard_concrete(log_alpha: torch.Tensor, sample: bool) -> torch.Tensor:
    """Gates z in [0, 1]: sampled (training) or deterministic (the final mask)."""
    if sample:
        u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / BETA)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) summed: the relaxed L0 norm of the difference vector."""
    return torch.sigmoid(log_alpha - BETA * torch.log(torch.tensor(-GAMMA / ZETA))).sum()


class _Functional(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can replace backbone tensors."""

    def __init__(self, model: Any, loss_fn: Loss) -> None:
        super().__init__()
        self.wrapped = model
        object.__setattr__(self, "loss_fn", loss_fn)

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.wrapped, batch)


def diff_pruning(model: Any, batches: Iterable[Any], loss_fn: Loss, support: SupportConfig,
                 penalty: float, lr: float = 0.05, alpha_lr: float = 0.1, init_log_alpha: float = 1.0
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Guo et al. 2021: learn δ = z ⊙ w on the eligible θ with ``penalty`` · Σ P(z > 0).

    w trains by Adam (``lr``); the gates' log α by plain SGD (``alpha_lr``), so the
    penalty's size matters (under Adam's per-entry normalisation any penalty that
    dominates a gate's gradient closes it at the same speed). Returns (indices, values) of the open gates' z ⊙ w; with K set (``support``), the
    K of largest |z ⊙ w| among them (Guo et al. reach an exact sparsity by magnitude).
    θ is not modified (``torch.func.functional_call``; not thread-safe: run it alone).
    """
    if penalty < 0:
        raise XlpeftValueError(f"`penalty` can be ≥ 0 (the L0 weight); got {penalty!r}")
    params = eligible(model, support)
    total = sum(p.numel() for p in params.values())
    w = {n: torch.zeros_like(p, dtype=torch.float32, requires_grad=True) for n, p in params.items()}
    la = {n: torch.full_like(p, init_log_alpha, dtype=torch.float32, requires_grad=True) for n, p in params.items()}
    optimizer = torch.optim.Adam(list(w.values()), lr=lr)
    gate_optimizer = torch.optim.SGD(list(la.values()), lr=alpha_lr)
    module = _Functional(model, loss_fn)
    path = {id(p): n for n, p in model.model.named_parameters()}  # SFT names are base-relative
    for batch in batches:
        replaced = {f"wrapped.model.{path[id(p)]}": (p.detach().float() + hard_concrete(la[n], True) * w[n]
                                                       ).to(p.dtype) for n, p in params.items()}
        loss = torch.func.functional_call(module, replaced, (batch,), tie_weights=True)
        loss = loss + penalty * sum(expected_l0(a) for a in la.values())
        optimizer.zero_grad()
        gate_optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        gate_optimizer.step()
    with torch.no_grad():
        gates = {n: hard_concrete(la[n], False) for n in params}
        deltas = {n: gates[n] * w[n] for n in params}
    scores = {n: torch.where(gates[n] > 0, deltas[n].abs() + 1e-30, torch.zeros_like(w[n])) for n in params}
    open_gates = int(sum((s > 0).sum() for s in scores.values()))
    if not open_gates:
        raise XlpeftValueError(f"DiffPruning closed every gate (penalty={penalty}); lower the penalty")
    k = min(budget(model, support, total), open_gates) if support.sets_k else open_gates
    indices = top_k(scores, k)
    return indices, {n: deltas[n].reshape(-1)[i].detach().clone() for n, i in indices.items()}


def density(indices: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> float:
    """Kept entries over eligible entries."""
    return sum(i.numel() for i in indices.values()) / max(1, sum(p.numel() for p in params.values()))


def combine_sfts(model: Any, new_name: str, coefficients: Mapping[str, float]) -> str:
    """A new SFT Σ cᵢ·φᵢ over the union of the SFTs' supports (AdapterSoup averaging: cᵢ = 1/n).

    Exact in float32: θ + Σ cᵢφᵢ is what ``Stack`` of the scaled SFTs would apply.
    """
    if not isinstance(coefficients, Mapping) or not coefficients:
        raise XlpeftValueError("`coefficients` can be a non-empty dict: SFT name → weight")
    model.require_adapters(*coefficients)
    dense = [n for n in coefficients if not getattr(model.configs[n], "sparse", False)]
    if dense:
        raise XlpeftValueError(f"combine_sfts combines sparse fine-tunings; got the adapter(s) {dense}")
    params = parameters(model)
    totals: dict[str, torch.Tensor] = {}
    support: dict[str, torch.Tensor] = {}
    for name, c in coefficients.items():
        for pname, point in model.adapter_places(name).items():
            delta = point.adapters[name]
            flat = totals.setdefault(pname, torch.zeros(params[pname].numel()))
            mask = support.setdefault(pname, torch.zeros(params[pname].numel(), dtype=torch.bool))
            idx = delta.indices.cpu()
            flat.index_add_(0, idx, delta.values.detach().float().cpu() * float(c))
            mask[idx] = True
    indices = {p: m.nonzero().reshape(-1) for p, m in support.items()}
    model.add_sft(new_name, indices, {p: totals[p][i] for p, i in indices.items()})
    return new_name
