"""A real cross-lingual classification task: the canon section of a Bible verse.

Labels are the seven sections of the 66-book canon (books 1-5 Law, 6-17
History, 18-22 Wisdom/Poetry, 23-39 Prophets, 40-44 Gospels and Acts, 45-65
Epistles, 66 Apocalyptic). Because every edition shares verse keys and the
split is by chapter (:func:`xlpeft.data.bible.chapter_split`), the train,
validation and test sets hold the same chapters, hence the same labels, in
every language: train a task adapter in one language, test zero-shot in another.
"""

from __future__ import annotations

from xlpeft.data._common import stable_fraction
from xlpeft.data.bible import GENRES, Verse, bible_split, book_genre
from xlpeft.errors import XlpeftValueError
from xlpeft.languages import resolve

__all__ = ["GENRES", "book_genre", "genre_examples"]


def _subsample(verses: list[Verse], k: int, seed: int) -> list[Verse]:
    """The ``k`` verses with the smallest seeded hash of their key.

    Keyed by (book, chapter, verse), not by list position, so two languages
    keep the same verses wherever both editions have them.
    """
    ranked = sorted(verses, key=lambda v: stable_fraction(f"genre:{seed}:{v.book}:{v.chapter}:{v.verse}"))
    keep = {(v.book, v.chapter, v.verse) for v in ranked[:k]}
    return [v for v in verses if (v.book, v.chapter, v.verse) in keep]


def genre_examples(
    lang: str,
    split: str,
    edition: str | None = None,
    max_per_genre: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Verses of ``split`` labelled with their section, in canonical order.

    Each example is ``{"text", "label", "lang", "book", "chapter", "verse"}``
    with ``label`` one of :data:`GENRES`. ``max_per_genre`` keeps at most that
    many verses per label (balanced subsampling, fixed by ``seed``).
    """
    if max_per_genre is not None and (isinstance(max_per_genre, bool) or int(max_per_genre) < 1):
        raise XlpeftValueError(f"`max_per_genre` can be a positive integer or None; got {max_per_genre!r}")
    verses = bible_split(lang, split, edition)  # validates lang, split and edition
    code = resolve(lang)
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
