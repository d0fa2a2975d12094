"""Typology-weighted averaging: an unseen language's adapter as a weight-space
average of trained language adapters, weighted by typological similarity.

Chronopoulou et al. 2023, "AdapterSoup: Weight Averaging to Improve
Generalization of Pretrained Language Models" (EACL) average adapters in
weight space; here the weights come from URIEL typology instead of text:

    w_i = softmax_i(cos(t_target, t_i) / temperature)
    θ_target = Σ_i w_i θ_i          (AdaptedModel.average_adapters)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from xlpeft.errors import XlpeftValueError
from xlpeft.typology import DEFAULT_FEATURES, typological_similarity, uriel_code

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel


def typology_weights(target: str, sources: Sequence[str], features: str = DEFAULT_FEATURES,
                     temperature: float = 0.05) -> dict[str, float]:
    """Softmax of typological similarity over ``sources`` (the target itself excluded)."""
    if temperature <= 0:
        raise XlpeftValueError(f"`temperature` must be > 0; got {temperature!r}")
    own = uriel_code(target)
    pool = [s for s in sources if uriel_code(s) != own]
    if not pool:
        raise XlpeftValueError(f"`sources` can be languages other than {target!r}; got {list(sources)}")
    sims = np.array([typological_similarity(target, s, features) for s in pool])
    z = np.exp((sims - sims.max()) / temperature)
    return {s: float(v) for s, v in zip(pool, z / z.sum())}


def average_by_typology(model: AdaptedModel, target: str, sources: Sequence[str],
                        name: str | None = None, features: str = DEFAULT_FEATURES,
                        temperature: float = 0.05) -> dict[str, float]:
    """Add adapter ``name`` (default ``target``) averaging ``sources``; returns the weights used."""
    weights = typology_weights(target, sources, features, temperature)
    model.average_adapters(name or target, list(weights), list(weights.values()))
    return weights
