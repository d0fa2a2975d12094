"""Prune a named adapter at initialisation (SparseAdapter, He et al. 2022).

    model.add_adapter("swh", BottleneckConfig(init_zero_up=False))
    sparsify(model, "swh", 0.8, method="snip", batches=[batch, ...])
    model.train_adapters("swh")          # masks stay fixed: W ⊙ M in every forward

    wide, s = large_sparse(BottleneckConfig(), 4)   # Large-Sparse: 4× wider, s = 0.75
    model.add_adapter("swh", wide); sparsify(model, "swh", s, method="magnitude")

Every ``MaskedLinear`` weight of the adapter is pruned (bottleneck down/up,
LoRA A and B, invertible F/G); biases, gates and vectors are not. Masks are
buffers, so ``save_adapter``/``load_adapter`` keep them. Scores of a layer
whose weights are all zero (``init_zero_up=True``, ``init_zero_b=True``) are
all tied, so such a layer is pruned at random to the target sparsity, and a
zero up-projection also zeroes the gradient reaching the down-projection:
for informative SNIP/GraSP/magnitude scores build the adapter with a
non-zero init (``init_zero_up=False``, as in the paper's setting).
A ``global`` ranking compares raw scores across layers (as the paper and
SNIP/GraSP do), so layers initialised at a smaller scale (``nn.Linear``
scales by fan-in) can be emptied whole: the summary lists them under
``emptied`` with a warning; ``scope="layer"`` or ``method="er"`` avoid it.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from xlpeft.core.composition import Setup, leaves
from xlpeft.errors import XlpeftValueError
from xlpeft.methods._layers import MaskedLinear
from xlpeft.methods.sparse import (
    METHODS, SparseConfig, data_free_scores, er_keep, grasp_scores, large_sparse,
    masks_from_scores, snip_scores,
)

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel

__all__ = ["METHODS", "large_sparse", "prunable_layers", "sparsify"]

LossFn = Callable[[Any, dict], torch.Tensor]


def prunable_layers(model: AdaptedModel, name: str) -> list[tuple[str, MaskedLinear]]:
    """The adapter's ``MaskedLinear`` layers, with their names in ``model``."""
    qualified = {id(m): n for n, m in model.named_modules()}
    found: dict[int, MaskedLinear] = {}
    for module in model.adapter_modules(name):
        for sub in module.modules():
            if isinstance(sub, MaskedLinear):
                found.setdefault(id(sub), sub)
    return [(qualified.get(i, "?"), layer) for i, layer in found.items()]


def sparsify(model: AdaptedModel, name: str, sparsity: float, method: str = "snip",
             batches: Iterable[dict] | None = None, loss_fn: LossFn | None = None, *,
             scope: str = "global", n_batches: int = 1, seed: int = 0,
             setup: Setup | None = None) -> dict[str, Any]:
    """Fix a sparsity mask on every weight matrix of adapter ``name``; returns a summary.

    ``method``: ``random``, ``magnitude``, ``er``, ``snip`` or ``grasp``. The
    last two run the model under ``setup`` (default: the adapter alone) on
    the first ``n_batches`` of ``batches``; the loss is ``loss_fn(outputs,
    batch)`` when given, else ``outputs.loss`` (batches with labels).
    Summary: ``layers``, ``kept``, ``total``, ``sparsity`` (achieved),
    ``method``, ``scope``, ``per_layer`` {name: (kept, total)} and
    ``uninformed`` (layers whose scores were all tied, pruned at random) and
    ``emptied`` (layers left with no weight by a global ranking).
    """
    config = SparseConfig(sparsity, method, scope, n_batches, seed)
    model.require_adapters(name)
    if model.is_merged(name):
        raise XlpeftValueError(f"adapter {name!r} is merged; unmerge({name!r}) before sparsify")
    layers = prunable_layers(model, name)
    if not layers:
        raise XlpeftValueError(
            f"adapter {name!r} ({model.configs[name].method}) has no prunable weights: sparsify "
            "prunes the weight matrices of bottleneck, lora and invertible adapters "
            "(not ia3/bitfit vectors, compacter PHM factors or prefixes)"
        )
    if config.needs_data and batches is None:
        raise XlpeftValueError(
            f"`method` {method!r} scores weights with gradients: pass `batches` (a few input "
            "dicts, with labels or a `loss_fn`), or use a data-free method: random, magnitude, er"
        )
    weights = [layer.weight for _, layer in layers]
    generator = torch.Generator().manual_seed(seed)
    keep = er_keep([w.shape for w in weights], sparsity) if method == "er" else None
    if config.needs_data:
        scores = _data_scores(model, name, config, weights, batches, loss_fn, setup)
    else:
        scores = data_free_scores(method, weights, generator)
    masks, uninformed = masks_from_scores(scores, sparsity, scope, generator, keep)
    for (_, layer), mask in zip(layers, masks):
        layer.set_mask(mask)
    return _summary(config, layers, masks, uninformed)


def _summary(config: SparseConfig, layers: list[tuple[str, MaskedLinear]],
             masks: list[torch.Tensor], uninformed: list[int]) -> dict[str, Any]:
    per_layer = {n: (int(m.sum()), m.numel()) for (n, _), m in zip(layers, masks)}
    kept = sum(k for k, _ in per_layer.values())
    total = sum(t for _, t in per_layer.values())
    names = [layers[i][0] for i in uninformed]
    if names and config.method not in ("random", "er"):
        warnings.warn(
            f"{len(names)} of {len(layers)} layers had all-equal {config.method} scores (zero "
            f"weights or zero gradients, e.g. {names[0]}); they were pruned at random. Build the "
            "adapter with a non-zero init (init_zero_up=False / init_zero_b=False) for informative scores",
            stacklevel=3,
        )
    emptied = [n for n, (k, t) in per_layer.items() if t and not k]
    if emptied:
        warnings.warn(
            f"{len(emptied)} layers lost every weight in the {config.scope} ranking (e.g. {emptied[0]}), "
            "which silences their adapter; scope='layer' or method='er' keeps every layer alive",
            stacklevel=3,
        )
    return {"layers": len(layers), "kept": kept, "total": total, "sparsity": 1 - kept / total,
            "method": config.method, "scope": config.scope, "per_layer": per_layer,
            "uninformed": names, "emptied": emptied}


def _data_scores(model: AdaptedModel, name: str, config: SparseConfig,
                 weights: list[torch.Tensor], batches: Iterable[dict],
                 loss_fn: LossFn | None, setup: Setup | None) -> list[torch.Tensor]:
    if setup is not None and name not in leaves(setup):
        raise XlpeftValueError(f"`setup` must contain adapter {name!r}; got {setup!r}")
    chosen = list(itertools.islice(iter(batches), config.n_batches))
    if not chosen:
        raise XlpeftValueError(f"`batches` is empty; {config.method} needs at least one batch")

    def loss_of(batch: dict) -> torch.Tensor:
        return _loss(model, batch, loss_fn, setup if setup is not None else name)

    with _scoring(model, weights):
        if config.method == "snip":
            return snip_scores(weights, _mean_grads(loss_of, weights, chosen))
        return grasp_scores(weights, _hessian_grad(loss_of, weights, chosen))


@contextlib.contextmanager
def _scoring(model: AdaptedModel, weights: list[torch.Tensor]) -> Iterator[None]:
    """Eval mode (reproducible scores) and gradients on the scored weights only."""
    was_training = model.training
    flags = [w.requires_grad for w in weights]
    model.eval()
    for w in weights:
        w.requires_grad_(True)
    try:
        yield
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
        model.train(was_training)


def _loss(model: AdaptedModel, batch: dict, loss_fn: LossFn | None, setup: Setup) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    inputs = {k: v for k, v in batch.items() if k not in ("adapters", "decoder_adapters")}
    outputs = model(**inputs, adapters=setup)
    if loss_fn is not None:
        return loss_fn(outputs, batch)
    loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if loss is None:
        raise XlpeftValueError(
            "the model output has no `loss` (batches without labels?) and no `loss_fn` was given; "
            "add labels to the batches or pass loss_fn(outputs, batch) -> scalar tensor"
        )
    return loss


def _grads(loss: torch.Tensor, weights: list[torch.Tensor], create_graph: bool = False) -> list:
    grads = torch.autograd.grad(loss, weights, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]


def _mean_grads(loss_of: Callable[[dict], torch.Tensor], weights: list[torch.Tensor],
                batches: list[dict]) -> list[torch.Tensor]:
    total = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        for t, g in zip(total, _grads(loss_of(batch), weights)):
            t += g.detach()
    return [t / len(batches) for t in total]


def _hessian_grad(loss_of: Callable[[dict], torch.Tensor], weights: list[torch.Tensor],
                  batches: list[dict]) -> list[torch.Tensor]:
    """``Hg`` as ∇(g_fixedᵀ ∇L): double backprop, attention on the math kernel
    (the fused SDPA kernels have no second derivative)."""
    g = _mean_grads(loss_of, weights, batches)
    hg = [torch.zeros_like(w) for w in weights]
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            for batch in batches:
                grads = _grads(loss_of(batch), weights, create_graph=True)
                z = sum((gi * fixed).sum() for gi, fixed in zip(grads, g))
                if not z.requires_grad:
                    continue
                for h, d in zip(hg, _grads(z, weights)):
                    h += d.detach()
    except RuntimeError as err:
        if "derivative" not in str(err) and "double backward" not in str(err):
            raise
        raise XlpeftValueError(
            f"grasp needs second derivatives, which this backbone's kernels lack ({err}); "
            "load it with attn_implementation='eager' or use method='snip'"
        ) from err
    return [h / len(batches) for h in hg]

