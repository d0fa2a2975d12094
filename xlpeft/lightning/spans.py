"""Span-level F1 for BIO tags (the CoNLL NER metric), without extra packages."""

from __future__ import annotations

from collections.abc import Sequence


def spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entity spans ``(type, start, end)``; an ``I-`` without ``B-`` starts a span."""
    found, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        inside = tag.startswith("I-") and kind == tag[2:]
        if start is not None and not inside:
            found.add((kind, start, i))
            start, kind = None, None
        if tag.startswith("B-") or (tag.startswith("I-") and not inside):
            start, kind = i, tag[2:]
    return found


def span_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> float:
    """Micro F1 over exact-match spans of all sentences."""
    tp = fp = fn = 0
    for g, p in zip(gold, pred):
        gs, ps = spans(g), spans(p)
        tp += len(gs & ps)
        fp += len(ps - gs)
        fn += len(gs - ps)
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)
