"""Typology vectors from lang2vec/URIEL, for carded and card-less languages.

Generators (MAD-G, Hyper-X) condition adapter weights on these vectors, so
they must be cheap to fetch repeatedly: results are cached in-process.

Codes: a code with a card (``languages/*.toml``, aliases and names included)
uses the card's ``lang2vec`` code; any other code URIEL knows works as is
(an adapter can be generated for any of lang2vec's 3,718 languages); a
macrolanguage URIEL lacks (``nah``, ``grn`` …) maps to one individual language
(``MACROLANGUAGES``) with a logged note.

Missing values: the kNN-predicted sets (``*_knn``) are complete, but the
observed sets (``syntax_wals``, ``phonology_ethnologue``, ...) mark unknown
features with lang2vec's "--". ``missing="nan"`` (default) keeps them as
``nan`` and :func:`typological_similarity` compares only the features known
for both languages (cosine over the shared mask; 0.0 when they share none).
``missing="knn"`` imputes each unknown value from the same domain's kNN
prediction (``syntax_wals`` → ``syntax_knn``), which is what generators use;
``missing="zero"`` fills zeros. A language with *no* known value in the
chosen sets is refused by :func:`complete_vector` unless ``missing="knn"``.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence

import numpy as np

from xlpeft._compat import import_lang2vec
from xlpeft.errors import XlpeftKeyError, XlpeftValueError, close_matches
from xlpeft.languages import all_languages, get_language, resolve

DEFAULT_FEATURES = "syntax_knn+phonology_knn+inventory_knn"
MISSING = ("nan", "knn", "zero")
_DOMAINS = ("syntax", "phonology", "inventory")
logger = logging.getLogger(__name__)

MACROLANGUAGES: dict[str, str] = {
    "nah": "nci",  # Nahuatl → Classical Nahuatl
    "grn": "gug",  # Guarani → Paraguayan Guarani
    "zho": "cmn", "chi": "cmn",  # Chinese → Mandarin
    "ara": "arb",  # Arabic → Standard Arabic
    "fas": "pes", "per": "pes",  # Persian → Iranian Persian
    "msa": "zsm", "may": "zsm",  # Malay → Standard Malay
    "swa": "swh",  # Swahili → Coastal Swahili
    "que": "quy",  # Quechua → Ayacucho Quechua
    "uzb": "uzn",  # Uzbek → Northern Uzbek
    "mon": "khk",  # Mongolian → Khalkha
    "orm": "gaz",  # Oromo → West Central Oromo
}
"""ISO 639-3 macrolanguage (or 639-2/B) codes URIEL lacks → the individual language used."""


def _parts(l2v, features: str) -> list[str]:
    """The feature sets named in ``a+b|c``, each checked to exist in lang2vec.

    ``learned`` is refused: lang2vec stores it as a pickled object array (it
    also fails to load under numpy 2), and xlpeft never unpickles data.
    """
    allowed = [f for f in l2v.FEATURE_SETS if f != "learned"]
    parts = re.split(r"[+|]", features) if isinstance(features, str) else [features]
    if not all(p in allowed for p in parts):
        raise XlpeftValueError(
            f"`features` can be a '+'/'|' combination of {', '.join(allowed)}; got {features!r}"
        )
    return parts


def _card_code(code: str) -> str | None:
    """The card's lang2vec code, or None when no card means ``code``."""
    try:
        card = get_language(resolve(code))
    except XlpeftKeyError:
        return None
    if card.lang2vec is None:
        raise XlpeftKeyError(f"language {card.code!r} has no lang2vec code; set `lang2vec` in languages/{card.code}.toml")
    return card.lang2vec


@functools.lru_cache(maxsize=4096)
def uriel_code(code: str) -> str:
    """The URIEL code typology uses for ``code`` (card, URIEL code, ISO 639-1, macrolanguage)."""
    l2v = import_lang2vec()
    key = str(code).strip().lower()
    known = {str(c) for c in l2v.URIEL_LANGUAGES}
    found = _card_code(key)  # ambiguous aliases raise here
    if found is None:
        found = l2v.LETTER_CODES.get(key, key) if len(key) == 2 else key
        if found not in known and found in MACROLANGUAGES:
            individual = MACROLANGUAGES[found]
            logger.info("lang2vec has no %r (a macrolanguage); using %r for its typology", found, individual)
            found = individual
    if found not in known:
        pool = {c.code for c in all_languages()} | known
        close = close_matches(key, pool, n=5)
        raise XlpeftKeyError(
            f"unknown language code {code!r}: `code` can be a language card code/alias or one of "
            f"lang2vec's {len(known)} URIEL codes; got {code!r}."
            + (f" Did you mean {', '.join(repr(c) for c in close)}?" if close else "")
            + " Add a card to languages/ with a `lang2vec` code URIEL knows."
        )
    return found


@functools.lru_cache(maxsize=1024)
def _raw(l2v_code: str, features: str) -> np.ndarray:
    l2v = import_lang2vec()
    values = l2v.get_features([l2v_code], features)[l2v_code]
    vec = np.array([np.nan if v == "--" else float(v) for v in values], dtype=np.float64)
    vec.setflags(write=False)
    return vec


def _imputed(l2v_code: str, features: str, missing: str) -> np.ndarray:
    l2v = import_lang2vec()
    raw = _raw(l2v_code, features)
    if missing == "nan" or not np.isnan(raw).any():
        return raw
    out = raw.copy()
    if missing == "zero":
        out[np.isnan(out)] = 0.0
    else:  # knn: each set from its domain's kNN prediction (same features, same order)
        union = "|" in features
        chunks, start = [], 0
        for part in _parts(l2v, features) if not union else [features]:
            name = part.split("|")[0]
            n = len(_raw(l2v_code, part))
            chunk = out[start:start + n]
            domain = name.split("_")[0]
            if np.isnan(chunk).any() and domain in _DOMAINS:
                knn = _raw(l2v_code, f"{domain}_knn")
                if len(knn) == n:
                    chunk[np.isnan(chunk)] = knn[np.isnan(chunk)]
            chunks.append(chunk)
            start += n
        out = np.concatenate(chunks)
        out[np.isnan(out)] = 0.0  # a set with no kNN twin (none in lang2vec 1.1.2)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=1024)
def _vector(l2v_code: str, features: str, missing: str) -> np.ndarray:
    return _imputed(l2v_code, features, missing)


def typology_vector(code: str, features: str = DEFAULT_FEATURES, missing: str = "nan") -> np.ndarray:
    """Read-only float vector of a language's lang2vec features (cached).

    ``missing``: ``nan`` keeps unknown values as ``nan``; ``knn`` imputes them
    from the domain's kNN set; ``zero`` fills zeros (see the module docstring).
    """
    if missing not in MISSING:
        raise XlpeftValueError(f"`missing` can be {', '.join(MISSING)}; got {missing!r}")
    _parts(import_lang2vec(), features)
    return _vector(uriel_code(code), features, missing)


def complete_vector(code: str, features: str = DEFAULT_FEATURES, missing: str = "knn") -> np.ndarray:
    """A vector without ``nan`` for generators; refuses a language with no known value."""
    raw = typology_vector(code, features, "nan")
    if missing != "knn" and np.isnan(raw).all():
        raise XlpeftValueError(
            f"language {code!r} (URIEL {uriel_code(code)!r}) has no known value in {features!r}: "
            f"`missing` can be 'knn' (impute from the kNN sets) or pick a *_knn feature set; got {missing!r}"
        )
    if missing == "nan":
        missing = "zero"  # a generator cannot read nan: unknown values count as absent
    return typology_vector(code, features, missing)


def typological_similarity(a: str, b: str, features: str = DEFAULT_FEATURES) -> float:
    """Cosine similarity of two languages over the features known for both."""
    va, vb = typology_vector(a, features), typology_vector(b, features)
    mask = ~(np.isnan(va) | np.isnan(vb))
    x, y = va[mask], vb[mask]
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / norm) if norm > 0 else 0.0


@functools.lru_cache(maxsize=1)
def _family_table() -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """URIEL's family-tree matrix, read once (lang2vec re-reads the archive per feature: minutes)."""
    from xlpeft._compat import resource_filename
    import_lang2vec()
    with np.load(resource_filename("lang2vec.lang2vec", "data/family_features.npz")) as db:
        langs, feats, data = db["langs"], db["feats"], db["data"][:, :, 0] == 1.0
    return {str(c): i for i, c in enumerate(langs)}, feats, data


@functools.lru_cache(maxsize=1024)
def lineage(code: str) -> tuple[str, ...]:
    """URIEL's family-tree nodes of a language, root first (``Indo-European``, ``Germanic`` …)."""
    index, feats, data = _family_table()
    row = index.get(uriel_code(code))
    if row is None:
        return ()
    return tuple(str(f)[2:] for f in feats[data[row]])


def family_similarity(a: str, b: str) -> float:
    """Share of family-tree nodes in common (Jaccard): 1 same lineage, 0 other families."""
    la, lb = set(lineage(a)), set(lineage(b))
    return len(la & lb) / len(la | lb) if la | lb else 0.0


def relatedness(a: str, b: str, features: str = DEFAULT_FEATURES) -> dict[str, object]:
    """Typological cosine, family-tree overlap, and same family / genus (first two nodes)."""
    la, lb = lineage(a), lineage(b)
    return {"typology": typological_similarity(a, b, features), "family": family_similarity(a, b),
            "same_family": bool(la and lb and la[0] == lb[0]),
            "same_genus": bool(len(la) > 1 and len(lb) > 1 and la[:2] == lb[:2])}


def nearest_languages(code: str, candidates: Sequence[str], k: int = 1,
                      features: str = DEFAULT_FEATURES,
                      family_weight: float = 0.0) -> list[tuple[str, float]]:
    """The ``k`` candidates most similar to ``code``, best first, as ``(candidate, score)``.

    ``score`` = typological cosine + ``family_weight`` × family-tree overlap;
    ``code`` itself is skipped; ties keep candidate order.
    """
    if k < 1:
        raise XlpeftValueError(f"`k` must be ≥ 1; got {k!r}")
    target = uriel_code(code)
    scored = []
    for cand in candidates:
        if uriel_code(cand) == target:
            continue
        score = typological_similarity(code, cand, features)
        if family_weight:
            score += family_weight * family_similarity(code, cand)
        scored.append((cand, score))
    scored.sort(key=lambda t: -t[1])
    return scored[:k]
