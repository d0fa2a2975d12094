"""SparseAdapter: prune an adapter's weight matrices once, at initialisation.

He et al. 2022, "SparseAdapter: An Easy Approach for Improving the
Parameter-Efficiency of Adapters". Scores from Lee et al. 2019 (SNIP),
Wang et al. 2020 (GraSP) and Evci et al. 2020 (RigL's Erdős–Rényi densities).

    adapter weights W ─► score S(W) ─► keep the top (1 − s) ─► mask M (fixed)
    forward: (W ⊙ M)·x     (``MaskedLinear``; M is saved with the adapter)

Scores (higher = kept):

    random      uniform noise
    magnitude   |w|
    snip        |w ⊙ g|           g: gradient of the loss, summed over batches
    grasp       w ⊙ Hg            GraSP removes the *largest* −w ⊙ Hg, i.e.
                                  keeps the largest w ⊙ Hg (Hg by double backprop)
    er          no score: layer l keeps a fraction ε·(n_in + n_out)/(n_in·n_out)
                (capped at 1, ε set to meet the global sparsity), at random

Every ``MaskedLinear`` weight of the adapter is prunable (bottleneck
down/up, LoRA A/B, invertible F/G); biases, gates, vectors (IA3, BitFit) and
PHM factors (Compacter) are not. This file holds the arithmetic on plain
tensors; ``xlpeft.ops.sparsify`` finds the layers and runs the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xlpeft.errors import XlpeftTypeError, XlpeftValueError
from xlpeft.methods.base import AdapterConfig, ConfigUnion, check_choice, check_positive

METHODS = ("random", "magnitude", "er", "snip", "grasp")
DATA_METHODS = ("snip", "grasp")
SCOPES = ("global", "layer")


@dataclass(frozen=True)
class SparseConfig:
    """How to prune one adapter at initialisation."""

    sparsity: float
    """Fraction of prunable weights removed, in [0, 1)."""
    method: str = "snip"
    """Score: ``random``, ``magnitude``, ``er``, ``snip`` or ``grasp``."""
    scope: str = "global"
    """``global`` ranks all layers together; ``layer`` prunes each layer to ``sparsity``.
    ``er`` sets its own per-layer densities and ignores this."""
    n_batches: int = 1
    """Batches used by the data-driven scores (``snip``, ``grasp``)."""
    seed: int = 0
    """Seed of the random scores and of the random tie-breaking."""

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        check_choice("method", self.method, METHODS)
        check_choice("scope", self.scope, SCOPES)
        check_positive("n_batches", self.n_batches)

    @property
    def needs_data(self) -> bool:
        """Whether the score needs batches and a loss."""
        return self.method in DATA_METHODS


def check_sparsity(sparsity: float) -> None:
    """``sparsity`` must be a number in [0, 1): 1 would remove every weight."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise XlpeftValueError(
            f"`sparsity` can be a fraction in [0, 1) (0.9 keeps 10% of the weights); got {sparsity!r}"
        )


def data_free_scores(method: str, weights: Sequence[torch.Tensor],
                     generator: torch.Generator) -> list[torch.Tensor]:
    """Scores that need no data: ``random``, ``magnitude`` (``er`` ranks at random)."""
    if method == "magnitude":
        return [w.detach().float().abs() for w in weights]
    return [torch.rand(w.shape, generator=generator) for w in weights]


def snip_scores(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """SNIP connection sensitivity ``|w ⊙ g|``."""
    return [(w.detach().float() * g.float()).abs() for w, g in zip(weights, grads)]


def grasp_scores(weights: Sequence[torch.Tensor], hg: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``w ⊙ Hg``: GraSP's −w ⊙ Hg negated, so that higher means kept."""
    return [w.detach().float() * h.float() for w, h in zip(weights, hg)]


def er_keep(shapes: Sequence[torch.Size], sparsity: float) -> list[int]:
    """Weights kept per layer under Erdős–Rényi: density ∝ (n_in + n_out)/(n_in·n_out).

    As in RigL, layers whose density would exceed 1 are made dense and ε is
    solved again for the rest; counts are then rounded by largest remainder
    so that their sum is exactly ``round((1 − s)·total)``.
    """
    sizes = [math.prod(s) for s in shapes]
    target = round((1 - sparsity) * sum(sizes))
    fan = [sum(s) for s in shapes]  # ratio·numel = n_in + n_out
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(shapes)) if i not in dense]
        budget = target - sum(sizes[i] for i in dense)
        eps = budget / max(1, sum(fan[i] for i in rest))
        over = [i for i in rest if eps * fan[i] > sizes[i]]
        if not over:
            break
        dense.add(max(over, key=lambda i: fan[i] / sizes[i]))
    ideal = [float(sizes[i]) if i in dense else eps * fan[i] for i in range(len(shapes))]
    return _round_to_total(ideal, sizes, target)


def _round_to_total(ideal: Sequence[float], caps: Sequence[int], total: int) -> list[int]:
    keep = [min(c, math.floor(x)) for x, c in zip(ideal, caps)]
    order = sorted(range(len(ideal)), key=lambda i: ideal[i] - math.floor(ideal[i]), reverse=True)
    left = total - sum(keep)
    for i in order * 2:
        if left <= 0:
            break
        if keep[i] < caps[i]:
            keep[i] += 1
            left -= 1
    return keep


def _uninformed(score: torch.Tensor) -> bool:
    """All scores equal (e.g. a zero-initialised up-projection): nothing to rank by."""
    return score.numel() > 0 and bool(score.max() == score.min())


def _top(score: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """A 0/1 mask keeping the ``k`` largest entries; ties are broken at random."""
    flat = score.reshape(-1)
    perm = torch.randperm(flat.numel(), generator=generator)
    order = perm[torch.argsort(flat[perm], descending=True, stable=True)]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(score.shape)


def masks_from_scores(scores: Sequence[torch.Tensor], sparsity: float, scope: str,
                      generator: torch.Generator,
                      keep: Sequence[int] | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """Masks keeping the highest scores; returns them and the uninformed layer indices.

    ``keep`` fixes the count per layer (ER). In ``layer`` scope each layer keeps
    ``round((1 − s)·n)`` (at least one). In ``global`` scope all layers are
    ranked together and exactly ``round((1 − s)·total)`` are kept, except
    that an *uninformed* layer (all scores tied) is pruned on its own at
    random to ``s``: ranked globally it would be removed whole.
    """
    scores = [s.detach().float().cpu() for s in scores]
    uninformed = [i for i, s in enumerate(scores) if _uninformed(s)]
    if keep is None and scope == "layer":
        keep = [max(1, round((1 - sparsity) * s.numel())) if s.numel() else 0 for s in scores]
    if keep is not None:
        return [_top(s, k, generator) for s, k in zip(scores, keep)], uninformed
    masks: list[torch.Tensor | None] = [None] * len(scores)
    budget = round((1 - sparsity) * sum(s.numel() for s in scores))
    for i in uninformed:
        masks[i] = _top(scores[i], round((1 - sparsity) * scores[i].numel()), generator)
        budget -= int(masks[i].sum())
    ranked = [i for i in range(len(scores)) if masks[i] is None]
    if ranked:
        flat = torch.cat([scores[i].reshape(-1) for i in ranked])
        chosen = _top(flat, max(0, budget), generator)
        for i, part in zip(ranked, chosen.split([scores[i].numel() for i in ranked])):
            masks[i] = part.reshape(scores[i].shape)
    return masks, uninformed


def large_sparse(config: AdapterConfig, k: float) -> tuple[AdapterConfig, float]:
    """SparseAdapter's Large-Sparse setting: ``k``× wider, pruned to sparsity 1 − 1/k.

    The kept weight count then equals the dense adapter's (up to rounding).
    Bottleneck/invertible widths grow through ``reduction_factor``; LoRA grows
    ``r`` and ``alpha`` together so that the scale α/r is unchanged. Union
    parts that ``sparsify`` does not prune (prefix, ia3 …) stay as they are.
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k < 1:
        raise XlpeftValueError(f"`k` can be a width multiplier ≥ 1 (e.g. 2, 4); got {k!r}")
    if not isinstance(config, AdapterConfig):
        raise XlpeftTypeError(f"`config` can be an AdapterConfig; got {type(config).__name__}")
    parts = tuple(_widen(part, k) for part in config.parts)
    if all(new is old for new, old in zip(parts, config.parts)):
        raise XlpeftValueError(
            f"large_sparse can widen 'bottleneck', 'invertible', 'lora' (and unions with them); "
            f"got only {[p.method for p in config.parts]}, which have no prunable width"
        )
    wide = ConfigUnion(parts) if isinstance(config, ConfigUnion) else parts[0]
    return wide, 1.0 - 1.0 / k


def _widen(config: AdapterConfig, k: float) -> AdapterConfig:
    """``config`` k× wider; parts without prunable weights (ia3, prefix …) unchanged."""
    if config.method == "lora":
        r = round(config.r * k)
        return config.replace(r=r, alpha=config.alpha * r / config.r)
    if config.method in ("bottleneck", "invertible"):
        return config.replace(reduction_factor=config.reduction_factor / k)
    return config
