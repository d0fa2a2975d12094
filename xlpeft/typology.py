"""Typology vectors from lang2vec/URIEL, keyed by language card.

Generators (MAD-G, Hyper-X) condition adapter weights on these vectors, so
they must be cheap to fetch repeatedly: results are cached in-process.

Missing values: the kNN-predicted sets (``*_knn``) are complete, but the
observed sets (``syntax_wals``, ``phonology_ethnologue``, ...) mark unknown
features with lang2vec's "--". Those become ``nan`` in the returned vector
and :func:`typological_similarity` compares only the features known for both
languages (cosine over the shared mask; 0.0 when they share none).
"""

from __future__ import annotations

import functools
import re

import numpy as np

from xlpeft._compat import import_lang2vec
from xlpeft.errors import XlpeftKeyError, XlpeftValueError
from xlpeft.languages import get_language

DEFAULT_FEATURES = "syntax_knn+phonology_knn+inventory_knn"


def _parts(l2v, features: str) -> list[str]:
    """The feature sets named in ``a+b|c``, each checked to exist in lang2vec.

    ``learned`` is refused: lang2vec stores it as a pickled object array, and
    xlpeft never unpickles data.
    """
    allowed = [f for f in l2v.FEATURE_SETS if f != "learned"]
    parts = re.split(r"[+|]", features)
    if not all(p in allowed for p in parts):
        raise XlpeftValueError(
            f"`features` can be a '+'/'|' combination of {', '.join(allowed)}; got {features!r}"
        )
    return parts


def _l2v_code(code: str, l2v) -> str:
    """The URIEL code of a card, checked to exist in the URIEL database."""
    card = get_language(code)
    if card.lang2vec is None:
        raise XlpeftKeyError(f"language {card.code!r} has no lang2vec code; set `lang2vec` in languages/{card.code}.toml")
    if card.lang2vec not in l2v.URIEL_LANGUAGES:
        raise XlpeftKeyError(
            f"URIEL has no vector for {card.lang2vec!r} (card {card.code!r}); "
            f"set `lang2vec` in languages/{card.code}.toml to a code URIEL knows"
        )
    return card.lang2vec


@functools.lru_cache(maxsize=512)
def _vector(l2v_code: str, features: str) -> np.ndarray:
    l2v = import_lang2vec()
    values = l2v.get_features([l2v_code], features)[l2v_code]
    vec = np.array([np.nan if v == "--" else float(v) for v in values], dtype=np.float64)
    vec.setflags(write=False)
    return vec


def typology_vector(code: str, features: str = DEFAULT_FEATURES) -> np.ndarray:
    """Read-only float vector of a language's lang2vec features (``nan`` = unknown)."""
    l2v = import_lang2vec()
    _parts(l2v, features)
    return _vector(_l2v_code(code, l2v), features)


def typological_similarity(a: str, b: str, features: str = DEFAULT_FEATURES) -> float:
    """Cosine similarity of two languages over the features known for both."""
    va, vb = typology_vector(a, features), typology_vector(b, features)
    mask = ~(np.isnan(va) | np.isnan(vb))
    x, y = va[mask], vb[mask]
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / norm) if norm > 0 else 0.0
