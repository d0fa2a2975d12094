"""A real cross-lingual classification task: the canon section of a Bible verse.

Labels are the seven sections of the 66-book canon (books 1-5 Law, 6-17
History, 18-22 Wisdom/Poetry, 23-39 Prophets, 40-44 Gospels and Acts, 45-65
Epistles, 66 Apocalyptic). Because every edition shares verse keys and the
split is by chapter (:func:`xlpeft.data.bible.chapter_split`), the train,
validation and test sets hold the same chapters, hence the same labels, in
every language: train a task adapter in one language, test zero-shot in another.

A single verse is often too short to tell its section (English accuracy ~40 %),
so ``passage=n`` labels *passages* of ``n`` consecutive verses instead: verses
``1..n``, ``n+1..2n`` … of each chapter, keyed by (book, chapter, first verse)
so every language holds the same passages (verses an edition lacks are skipped
inside a passage). A passage is the task on which zero-shot transfer becomes
measurable (see ``scripts/transfer_eval.py``).
"""

from __future__ import annotations

from xlpeft.data._common import check_split, stable_fraction
from xlpeft.data.bible import GENRES, Verse, bible_split, book_genre, chapter_split
from xlpeft.errors import XlpeftValueError
from xlpeft.languages import resolve

__all__ = ["GENRES", "book_genre", "genre_examples", "passages"]


def _subsample(verses: list[Verse], k: int, seed: int) -> list[Verse]:
    """The ``k`` verses with the smallest seeded hash of their key.

    Keyed by (book, chapter, verse), not by list position, so two languages
    keep the same verses wherever both editions have them.
    """
    ranked = sorted(verses, key=lambda v: stable_fraction(f"genre:{seed}:{v.book}:{v.chapter}:{v.verse}"))
    keep = {(v.book, v.chapter, v.verse) for v in ranked[:k]}
    return [v for v in verses if (v.book, v.chapter, v.verse) in keep]


def passages(verses: list[Verse], n: int) -> list[Verse]:
    """Consecutive verses grouped ``n`` at a time inside each chapter, as one ``Verse`` each.

    A passage is keyed by its first verse number slot (``1, n+1, 2n+1`` …), not by
    which verses an edition happens to have, so passages align across languages.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise XlpeftValueError(f"`passage` can be a positive integer (verses per example); got {n!r}")
    if n == 1:
        return list(verses)
    groups: dict[tuple[int, int, int], list[str]] = {}
    for v in verses:
        groups.setdefault((v.book, v.chapter, (v.verse - 1) // n * n + 1), []).append(v.text)
    return [Verse(b, c, first, " ".join(texts)) for (b, c, first), texts in groups.items()]


def genre_examples(
    lang: str,
    split: str,
    edition: str | None = None,
    max_per_genre: int | None = None,
    seed: int = 0,
    passage: int = 1,
    verses: list[Verse] | None = None,
) -> list[dict]:
    """Verses (or passages of ``passage`` verses) of ``split`` labelled with their section.

    Each example is ``{"text", "label", "lang", "book", "chapter", "verse"}``
    with ``label`` one of :data:`GENRES` (``verse`` is a passage's first verse),
    in canonical order. ``max_per_genre`` keeps at most that many per label
    (balanced subsampling, fixed by ``seed``). ``verses`` replaces the embedded
    edition with a user's own verse-aligned Bible (e.g. from a
    ``book<TAB>chapter<TAB>verse<TAB>text`` file); ``lang`` is then any code.
    """
    if max_per_genre is not None and (isinstance(max_per_genre, bool) or int(max_per_genre) < 1):
        raise XlpeftValueError(f"`max_per_genre` can be a positive integer or None; got {max_per_genre!r}")
    if verses is None:
        verses = bible_split(lang, split, edition)  # validates lang, split and edition
        code = resolve(lang)
    else:
        check_split(split)
        verses = [v for v in verses if chapter_split(v.book, v.chapter) == split]
        code = str(lang)
    verses = passages(verses, passage)
    by_genre: dict[str, list[Verse]] = {g: [] for g in GENRES}
    for verse in verses:
        by_genre[book_genre(verse.book)].append(verse)
    if max_per_genre is not None:
        by_genre = {g: _subsample(vs, int(max_per_genre), seed) for g, vs in by_genre.items()}
    chosen = sorted((v for vs in by_genre.values() for v in vs), key=lambda v: (v.book, v.chapter, v.verse))
    return [
        {"text": v.text, "label": book_genre(v.book), "lang": code,
         "book": v.book, "chapter": v.chapter, "verse": v.verse}
        for v in chosen
    ]
