"""UPOS-tagged treebanks shipped as CoNLL-U in PyPI packages (Turkish Web Treebank).

``turkish-treebanks`` 1.0.0 installs ``data/web.conllu`` and ``data/wiki.conllu``
at the top of site-packages (located through the package metadata). Its
tokens are inflectional groups (``Açık`` + ``la`` + ``nma`` + ``yan``) and its
tags are Google universal tags (``PRT``, ``CONJ``), the pre-UD-v2 tag set.
Splits follow the package's own rule: sentence i of a file is test when
i % 10 == 9, validation when i % 10 == 8, train otherwise.
"""

from __future__ import annotations

import functools
from pathlib import Path

from xlpeft.data._common import check_split, corpus_path
from xlpeft.data.conllu import Sentence, read_conllu
from xlpeft.errors import unknown
from xlpeft.languages import all_languages, get_language

_SPLIT_OF_REMAINDER = {8: "validation", 9: "test"}


def treebank_paths(lang: str = "tur") -> dict[str, Path]:
    """Installed CoNLL-U file of each section of a language's treebank."""
    card = get_language(lang)
    paths = {c.edition: corpus_path(c) for c in card.corpora if c.source == "treebank"}
    if not paths:
        have = [x.code for x in all_languages() if any(c.source == "treebank" for c in x.corpora)]
        raise unknown("treebank language", str(lang), have, hint="(only these cards list a `treebank` corpus)")
    return paths


@functools.lru_cache(maxsize=8)
def _read(path: str) -> tuple[Sentence, ...]:
    return tuple(read_conllu(path))


def treebank_sentences(lang: str = "tur", section: str | None = None, split: str | None = None) -> list[Sentence]:
    """Sentences (forms + UPOS) of one section or all, optionally of one split."""
    paths = treebank_paths(lang)
    if section is not None and section not in paths:
        raise unknown("treebank section", section, paths)
    if split is not None:
        check_split(split)
    out: list[Sentence] = []
    for name in sorted(paths):
        if section in (None, name):
            sents = _read(str(paths[name]))
            out += [s for i, s in enumerate(sents) if split in (None, _SPLIT_OF_REMAINDER.get(i % 10, "train"))]
    return out
