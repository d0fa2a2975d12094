"""Bible genre classification: same chapters, labels and splits in every language."""

from __future__ import annotations

from collections import Counter

import pytest

from xlpeft.data.bible import BOOK_CHAPTERS, bible_languages, bible_verses, chapter_split
from xlpeft.data.genre import GENRES, book_genre, genre_examples
from xlpeft.errors import XlpeftKeyError, XlpeftValueError

SPLITS = ("train", "validation", "test")


def test_genres_and_book_boundaries() -> None:
    assert GENRES == ("Law", "History", "Wisdom/Poetry", "Prophets", "Gospels and Acts", "Epistles", "Apocalyptic")
    firsts = {1: "Law", 5: "Law", 6: "History", 17: "History", 18: "Wisdom/Poetry", 22: "Wisdom/Poetry",
              23: "Prophets", 39: "Prophets", 40: "Gospels and Acts", 44: "Gospels and Acts",
              45: "Epistles", 65: "Epistles", 66: "Apocalyptic"}
    assert {b: book_genre(b) for b in firsts} == firsts
    for bad in (0, 67):
        with pytest.raises(XlpeftValueError, match=r"`book` can be 1\.\.66"):
            book_genre(bad)


def test_db_uses_books_1_to_66_with_the_listed_chapter_counts() -> None:
    chapters = Counter()
    for v in bible_verses("eng"):
        chapters[v.book] = max(chapters[v.book], v.chapter)
    assert tuple(chapters[b] for b in range(1, 67)) == BOOK_CHAPTERS and sum(BOOK_CHAPTERS) == 1189


def test_no_chapter_is_in_two_splits_and_every_genre_is_in_every_split() -> None:
    seen: dict[tuple[int, int], str] = {}
    for lang in ("eng", "swh"):
        for split in SPLITS:
            for ex in genre_examples(lang, split):
                key = (ex["book"], ex["chapter"])
                assert seen.setdefault(key, split) == split, key
    per_split = Counter(seen.values())
    assert per_split["test"] >= 50 and per_split["validation"] >= 50 and per_split["train"] > 1000
    for split in SPLITS:
        assert {book_genre(b) for (b, _), s in seen.items() if s == split} == set(GENRES)


def test_label_sets_and_chapters_are_identical_across_languages() -> None:
    reference = None
    for lang in bible_languages():
        exs = {s: genre_examples(lang, s) for s in ("validation", "test")}
        view = {s: ({e["label"] for e in ex}, {(e["book"], e["chapter"]) for e in ex}) for s, ex in exs.items()}
        assert all(labels == set(GENRES) for labels, _ in view.values()), lang
        reference = reference or view
        assert view == reference, lang


def test_examples_are_labelled_verses() -> None:
    exs = genre_examples("sw", "test")
    assert set(exs[0]) == {"text", "label", "lang", "book", "chapter", "verse"}
    assert all(e["lang"] == "swh" and e["label"] == book_genre(e["book"]) for e in exs)
    assert all(chapter_split(e["book"], e["chapter"]) == "test" for e in exs)
    keys = [(e["book"], e["chapter"], e["verse"]) for e in exs]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_balanced_subsampling_is_deterministic_and_parallel() -> None:
    eng = genre_examples("eng", "train", max_per_genre=50, seed=3)
    assert Counter(e["label"] for e in eng) == {g: 50 for g in GENRES}
    assert eng == genre_examples("eng", "train", max_per_genre=50, seed=3)
    other_seed = genre_examples("eng", "train", max_per_genre=50, seed=4)
    assert {(e["book"], e["chapter"], e["verse"]) for e in other_seed} != {(e["book"], e["chapter"], e["verse"]) for e in eng}
    fra = genre_examples("fra", "train", max_per_genre=50, seed=3)
    assert [(e["book"], e["chapter"], e["verse"]) for e in fra] == [(e["book"], e["chapter"], e["verse"]) for e in eng]
    assert [e["text"] for e in fra] != [e["text"] for e in eng]
    small = genre_examples("eng", "test", max_per_genre=100)
    counts = Counter(e["label"] for e in small)
    assert max(counts.values()) == 100 and counts["Apocalyptic"] < 100  # a genre with fewer keeps all


def test_genre_errors() -> None:
    with pytest.raises(XlpeftValueError, match="`max_per_genre` can be a positive integer or None; got 0"):
        genre_examples("eng", "train", max_per_genre=0)
    with pytest.raises(XlpeftValueError, match="`split` can be train, validation, test; got 'dev'"):
        genre_examples("eng", "dev")
    with pytest.raises(XlpeftKeyError, match="unknown Bible language 'nah'"):
        genre_examples("nah", "train")
