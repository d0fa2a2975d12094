"""Weight-space arithmetic of same-config adapters, each result a new named adapter.

Ilharco et al. 2023, "Editing Models with Task Arithmetic" (and language arithmetic
with adapters); Chronopoulou et al. 2023, "AdapterSoup"; Yadav et al. 2023,
"TIES-Merging: Resolving Interference When Merging Models"; Yu et al. 2024,
"Language Models are Super Mario" (DARE).

    task vector   τᵢ = θᵢ − θ₀         θ₀: the method's identity ((IA)3 scales: 1; else 0)
    combine       θ = θ₀ + Σ cᵢ τᵢ       analogy: a + λ(b − c);  average: Σ wᵢ θᵢ, Σ wᵢ = 1
    ties          τ̂ᵢ = top-k% of |τᵢ| (over the whole adapter) ─► γ = sign Σ wᵢ τ̂ᵢ
                  ─► τ = mean of wᵢ τ̂ᵢ over {i: sign τ̂ᵢ = γ} ─► θ₀ + λ τ
    dare          τ̃ᵢ = mᵢ ⊙ τᵢ / (1 − p),  mᵢ ~ Bernoulli(1 − p) ─► θ₀ + Σ wᵢ τ̃ᵢ

``space="factors"`` combines the stored parameters (AdapterSoup; for LoRA the A and B
factors separately, which is *not* combining the updates: (B₁+B₂)(A₁+A₂) ≠ B₁A₁+B₂A₂).
``space="delta"`` (non-gated LoRA only) combines the updates ΔWᵢ = s·BᵢAᵢ per linear and
writes a new LoRA with the same scale s: a linear combination is exact at rank Σ rᵢ
(concatenated factors, [A₁; A₂], [c₁B₁, c₂B₂]); ``rank=k`` instead truncates the SVD of
the combined update (approximate unless k ≥ its rank). TIES and DARE results are full
rank, so in delta space they need ``rank``. Sparsity masks: factors are combined as
masked (effective) values, masks united; delta-space results are dense.

Every operation checks everything (names, configs, arguments) and computes the
tensors before it adds the new adapter, and removes it on any error: a failed
call leaves the model as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from xlpeft.errors import XlpeftTypeError, XlpeftValueError

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel

__all__ = ["analogy", "average_adapters", "average_state_dicts", "combine", "dare", "dare_vectors",
           "task_vector", "ties", "ties_vectors"]

Vector = dict[str, torch.Tensor]
SPACES = ("factors", "delta")


# --------------------------------------------------------------------------- AdapterSoup


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]],
                        weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted average of same-shaped state dicts (AdapterSoup).

    Sparsity masks (bool) are united: a weight any member kept stays kept; a
    member without a mask counts as keeping everything.
    """
    if not states:
        raise XlpeftValueError("average_state_dicts needs at least one state dict; got none")
    weights = [1.0 / len(states)] * len(states) if weights is None else [float(w) for w in weights]
    if len(weights) != len(states) or sum(weights) <= 0:
        raise XlpeftValueError(
            f"`weights` can be one number per adapter ({len(states)}) with a positive sum; got {weights}"
        )
    keys = {k for s in states for k in s}
    uneven = sorted(k for k in keys if not k.endswith("weight_mask") and any(k not in s for s in states))
    if uneven:
        raise XlpeftValueError(f"adapters to average hold different tensors (e.g. {uneven[:3]}); "
                               "only same-config adapters can be averaged")
    total = sum(weights)
    out = {}
    for key in sorted(keys):
        if key.endswith("weight_mask"):
            masks = [s[key].bool() if key in s else None for s in states]
            out[key] = (torch.stack([m for m in masks if m is not None]).any(0)
                        if all(m is not None for m in masks) else None)
            continue
        values = [s[key] for s in states]
        out[key] = sum(w / total * v.float() for w, v in zip(weights, values)).to(values[0].dtype)
    return {k: v for k, v in out.items() if v is not None}


def average_adapters(model: AdaptedModel, new_name: str, names: Sequence[str],
                     weights: Sequence[float] | None = None) -> str:
    """``AdaptedModel.average_adapters``: the weighted average of same-config adapters."""
    config = _same_config(model, new_name, names)
    tensors = average_state_dicts([model.adapter_state_dict(n) for n in names], weights)
    return _add(model, new_name, config, tensors)


# --------------------------------------------------------------------------- task vectors


def _identity(key: str, value: torch.Tensor) -> torch.Tensor:
    """θ₀ of one tensor: the value at which the method changes nothing ((IA)3 scales: 1)."""
    return torch.ones_like(value) if key.endswith("ia3_l") else torch.zeros_like(value)


def _effective(state: Mapping[str, torch.Tensor]) -> Vector:
    """Float tensors as they act (masked weights times their mask), in float32."""
    out = {}
    for key, value in state.items():
        if key.endswith("weight_mask") or not value.is_floating_point():
            continue
        mask = state.get(key + "_mask")
        value = value.detach().float().cpu()
        out[key] = value * mask.cpu() if mask is not None else value
    return out


def task_vector(state: Mapping[str, torch.Tensor]) -> Vector:
    """τ = θ − θ₀ of one adapter's state dict (float32, masks applied)."""
    return {k: v - _identity(k, v) for k, v in _effective(state).items()}


def _united_masks(states: Sequence[Mapping[str, torch.Tensor]]) -> Vector:
    keys = {k for s in states for k in s if k.endswith("weight_mask")}
    return {k: torch.stack([s[k].bool().cpu() for s in states]).any(0)
            for k in keys if all(k in s for s in states)}


# --------------------------------------------------------------------------- pure merges


def ties_vectors(vectors: Sequence[Vector], density: float, weights: Sequence[float]) -> Vector:
    """TIES over task vectors: trim (top ``density`` of each vector's entries by magnitude, over
    all its tensors together), elect the sign of the weighted sum, mean over the agreeing entries."""
    keys = sorted(vectors[0])
    trimmed = [_trim(v, keys, density) for v in vectors]
    out = {}
    for key in keys:
        stacked = torch.stack([w * t[key] for w, t in zip(weights, trimmed)])
        sign = torch.sign(stacked.sum(0))
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        count = agree.sum(0)
        out[key] = torch.where(count > 0, (stacked * agree).sum(0) / count.clamp(min=1), 0.0)
    return out


def _trim(vector: Vector, keys: list[str], density: float) -> Vector:
    flat = torch.cat([vector[k].reshape(-1) for k in keys])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    k = min(flat.numel(), max(1, round(density * flat.numel())))
    keep[torch.topk(flat.abs(), k).indices] = True
    out, start = {}, 0
    for key in keys:
        n = vector[key].numel()
        out[key] = vector[key] * keep[start:start + n].view_as(vector[key])
        start += n
    return out


def dare_vectors(vectors: Sequence[Vector], drop: float, weights: Sequence[float],
                 generator: torch.Generator) -> Vector:
    """DARE: each entry of each vector dropped with probability ``drop``, the rest scaled by
    1/(1 − drop), then the weighted sum. Draws: ``torch.rand(shape, generator=generator)``
    per vector in the given order, per tensor in sorted key order; an entry drops where < ``drop``."""
    keys = sorted(vectors[0])
    out = {k: torch.zeros_like(vectors[0][k]) for k in keys}
    for w, vector in zip(weights, vectors):
        for key in keys:
            kept = torch.rand(vector[key].shape, generator=generator) >= drop
            out[key] += w * vector[key] * kept / (1.0 - drop)
    return out


def _linear(vectors: Sequence[Vector], weights: Sequence[float]) -> Vector:
    return {k: sum(w * v[k] for w, v in zip(weights, vectors)) for k in sorted(vectors[0])}


# --------------------------------------------------------------------------- public operations


def combine(model: AdaptedModel, new_name: str, coefficients: Mapping[str, float],
            space: str = "factors", rank: int | None = None) -> str:
    """Add ``new_name`` = θ₀ + Σ cᵢ (θᵢ − θ₀) over ``{name: cᵢ}``; returns the new name."""
    if not isinstance(coefficients, Mapping) or not coefficients:
        raise XlpeftTypeError(f"`coefficients` can be a non-empty mapping {{adapter name: number}}; "
                              f"got {coefficients!r}")
    names = list(coefficients)
    weights = _numbers("coefficients", [coefficients[n] for n in names], len(names))
    return _run(model, new_name, names, weights, space, rank, _linear, exact=True)


def analogy(model: AdaptedModel, new_name: str, a: str, b: str, c: str, scale: float = 1.0,
            space: str = "factors", rank: int | None = None) -> str:
    """Add ``new_name`` = a + λ(b − c): e.g. a task adapter moved from language c to language b."""
    coefficients: dict[str, float] = {}
    for name, coeff in ((a, 1.0), (b, float(scale)), (c, -float(scale))):
        coefficients[name] = coefficients.get(name, 0.0) + coeff
    return combine(model, new_name, coefficients, space=space, rank=rank)


def ties(model: AdaptedModel, new_name: str, names: Sequence[str], density: float = 0.2,
         scale: float = 1.0, weights: Sequence[float] | None = None, space: str = "factors",
         rank: int | None = None) -> str:
    """Add the TIES merge of ``names`` (``density``: the kept fraction of each task vector)."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise XlpeftValueError(f"`density` can be a number in (0, 1]; got {density!r}")
    weights = _numbers("weights", [1.0] * len(names) if weights is None else list(weights), len(names))
    lam = _numbers("scale", [scale], 1)[0]

    def merge(vectors: Sequence[Vector], w: Sequence[float]) -> Vector:
        return {k: lam * v for k, v in ties_vectors(vectors, float(density), w).items()}
    return _run(model, new_name, list(names), weights, space, rank, merge, exact=False)


def dare(model: AdaptedModel, new_name: str, names: Sequence[str], drop: float = 0.5,
         weights: Sequence[float] | None = None, seed: int = 0, space: str = "factors",
         rank: int | None = None) -> str:
    """Add the DARE merge of ``names``: drop-and-rescale each task vector, then the weighted sum."""
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1:
        raise XlpeftValueError(f"`drop` can be a probability in [0, 1); got {drop!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise XlpeftTypeError(f"`seed` can be an int; got {seed!r}")
    weights = _numbers("weights", [1.0] * len(names) if weights is None else list(weights), len(names))

    def merge(vectors: Sequence[Vector], w: Sequence[float]) -> Vector:
        return dare_vectors(vectors, float(drop), w, torch.Generator().manual_seed(seed))
    return _run(model, new_name, list(names), weights, space, rank, merge, exact=False)


# --------------------------------------------------------------------------- plumbing


def _numbers(what: str, values: Sequence[object], n: int) -> list[float]:
    ok = len(values) == n and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                  and math.isfinite(v) for v in values)
    if not ok:
        raise XlpeftValueError(f"`{what}` can be {n} finite number(s), one per adapter; got {list(values)!r}")
    return [float(v) for v in values]


def _same_config(model: AdaptedModel, new_name: str, names: Sequence[str]):
    if isinstance(names, str) or not names:
        raise XlpeftValueError(f"`names` can be a non-empty list of adapter names; got {names!r}")
    model.require_adapters(*names)
    if new_name in model.adapter_names:
        raise XlpeftValueError(f"an adapter named {new_name!r} already exists; pick another name for the "
                               "result or delete_adapter it first")
    if any(getattr(model.configs[n], "sparse", False) for n in names):  # same config ≠ same support
        raise XlpeftValueError(f"{list(names)} include sparse fine-tunings, whose entries differ between SFTs; "
                               "combine SFTs with xlpeft.ops.sft_select.combine_sfts (union of their supports)")
    configs = {repr(model.configs[n].to_dict()) for n in names}
    if len(configs) != 1:
        methods = sorted({model.configs[n].method for n in names})
        raise XlpeftValueError(
            f"adapters {list(names)} have different configs (methods {', '.join(methods)}); only "
            "same-config adapters can be combined: train them with one config"
        )
    return model.configs[names[0]]


def _run(model: AdaptedModel, new_name: str, names: list[str], weights: list[float], space: str,
         rank: int | None, merge: Callable[[Sequence[Vector], Sequence[float]], Vector], exact: bool) -> str:
    if space not in SPACES:
        raise XlpeftValueError(f"`space` can be {', '.join(SPACES)}; got {space!r}")
    config = _same_config(model, new_name, names)
    states = [model.adapter_state_dict(n) for n in names]
    if space == "delta":
        config, tensors = _delta_result(config, states, weights, merge, exact, rank)
        return _add(model, new_name, config, tensors)
    if rank is not None:
        raise XlpeftValueError(f"`rank` applies to space='delta' only; got rank={rank!r} with space='factors'")
    merged = merge([task_vector(s) for s in states], weights)
    dtypes = {k: v.dtype for k, v in states[0].items()}
    tensors = {k: (v + _identity(k, v)).to(dtypes[k]) for k, v in merged.items()}
    return _add(model, new_name, config, {**tensors, **_united_masks(states)})


def _add(model: AdaptedModel, new_name: str, config, tensors: dict[str, torch.Tensor]) -> str:
    """Add ``new_name`` with ``tensors``; removed again on any error."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise XlpeftValueError(f"the combination has NaN or infinite values in {bad[:3]}; "
                               "use smaller coefficients or check the source adapters")
    model.add_adapter(new_name, config)
    try:
        model.load_adapter_state_dict(new_name, tensors)
    except BaseException:
        model.delete_adapter(new_name)
        raise
    return new_name


def _delta_result(config, states: list[dict[str, torch.Tensor]], weights: list[float],
                  merge: Callable[[Sequence[Vector], Sequence[float]], Vector], exact: bool,
                  rank: int | None) -> tuple[object, dict[str, torch.Tensor]]:
    """The new LoRA config and tensors whose s·BA is the merged update of every linear."""
    from xlpeft.methods.lora import LoRAConfig

    if not isinstance(config, LoRAConfig) or config.gated:
        got = f"{config.method}{' (gated)' if getattr(config, 'gated', False) else ''}"
        raise XlpeftValueError(f"space='delta' can combine non-gated LoRA adapters (updates s·BA); got {got}. "
                               "Use space='factors'")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise XlpeftValueError(f"`rank` can be a positive int or None; got {rank!r}")
    if rank is None and not exact:
        raise XlpeftValueError("TIES and DARE give full-rank updates: in space='delta' pass rank=k "
                               "(a truncated SVD, approximate) or use space='factors'")
    s = config.alpha / config.r
    eff = [_effective(state) for state in states]
    places = sorted(k[:-len(".lora_A.weight")] for k in eff[0] if k.endswith(".lora_A.weight"))
    dtype = states[0][f"{places[0]}.lora_A.weight"].dtype
    out: dict[str, torch.Tensor] = {}
    if rank is None:  # exact: s·[c₁B₁ … cₙBₙ]·[A₁; …; Aₙ] = Σ cᵢ s·BᵢAᵢ
        new_rank = config.r * len(states)
        for p in places:
            out[f"{p}.lora_A.weight"] = torch.cat([e[f"{p}.lora_A.weight"] for e in eff], 0)
            out[f"{p}.lora_B.weight"] = torch.cat([w * e[f"{p}.lora_B.weight"] for w, e in zip(weights, eff)], 1)
    else:
        new_rank = rank
        deltas = [{p: s * e[f"{p}.lora_B.weight"] @ e[f"{p}.lora_A.weight"] for p in places} for e in eff]
        merged = merge(deltas, weights)
        for p in places:
            if rank > min(merged[p].shape):
                raise XlpeftValueError(f"`rank` can be at most {min(merged[p].shape)} (the smaller side of "
                                       f"{p}'s {tuple(merged[p].shape)} update); got {rank}")
            u, sv, vh = torch.linalg.svd(merged[p], full_matrices=False)
            out[f"{p}.lora_A.weight"] = vh[:rank]
            out[f"{p}.lora_B.weight"] = u[:, :rank] * sv[:rank] / s
    new = config.replace(r=new_rank, alpha=s * new_rank)
    return new, {k: v.to(dtype) for k, v in out.items()}
