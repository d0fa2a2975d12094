"""A user's own verse-aligned Bible, for a language the embedded editions lack.

Two layouts are read, both keyed by (book, chapter, verse) on the KJV
versification the embedded editions share, so a user's passages align with
every embedded language and fall in the same chapter split:

* a text file, one verse per line: ``book<TAB>chapter<TAB>verse<TAB>text``
  (an optional header line ``book<TAB>chapter<TAB>verse<TAB>text``);
* a folder of JSON chapters, one file per chapter:
  ``{"book": "JHN", "chapter": 3, "verses": {"16": "…", "17": "…"}}``
  (``verses`` may also be a list of ``{"verse": 16, "text": "…"}``).

``book`` is a number 1..66 (Genesis..Revelation) or a USFM book id (``GEN`` …
``REV``, case-insensitive). Verse text is cleaned as the embedded editions are
(:func:`xlpeft.data.bible.clean_verse`); verses that clean to nothing are dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

from xlpeft.data.bible import BOOK_CHAPTERS, Verse, clean_verse
from xlpeft.errors import CorruptFileError, XlpeftValueError

__all__ = ["USFM_BOOKS", "book_number", "read_bible"]

USFM_BOOKS = (
    "GEN EXO LEV NUM DEU JOS JDG RUT 1SA 2SA 1KI 2KI 1CH 2CH EZR NEH EST JOB PSA PRO ECC SNG "
    "ISA JER LAM EZK DAN HOS JOL AMO OBA JON MIC NAM HAB ZEP HAG ZEC MAL "
    "MAT MRK LUK JHN ACT ROM 1CO 2CO GAL EPH PHP COL 1TH 2TH 1TI 2TI TIT PHM HEB JAS 1PE 2PE "
    "1JN 2JN 3JN JUD REV"
).split()
"""USFM ids of the 66 books, in canonical order (index + 1 is the book number)."""

_HEADER = ("book", "chapter", "verse", "text")


def book_number(book: object, where: str) -> int:
    """1..66 for a book number or USFM id; ``where`` (file:line) names the culprit in errors."""
    text = str(book).strip()
    if text.isdigit() and 1 <= int(text) <= 66:
        return int(text)
    if text.upper() in USFM_BOOKS:
        return USFM_BOOKS.index(text.upper()) + 1
    raise XlpeftValueError(f"{where}: book can be a number 1..66 or a USFM id (GEN … REV); got {book!r}")


def _positive(value: object, what: str, where: str) -> int:
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise XlpeftValueError(f"{where}: {what} can be a positive integer; got {value!r}")
    return int(text)


def _verse(book: object, chapter: object, verse: object, text: object, where: str) -> Verse:
    number = book_number(book, where)
    ch = _positive(chapter, "chapter", where)
    if ch > BOOK_CHAPTERS[number - 1]:
        raise XlpeftValueError(f"{where}: book {USFM_BOOKS[number - 1]} has {BOOK_CHAPTERS[number - 1]} "
                               f"chapters (KJV versification); got chapter {ch}")
    if not isinstance(text, str):
        raise XlpeftValueError(f"{where}: verse text can be a string; got {type(text).__name__}")
    return Verse(number, ch, _positive(verse, "verse", where), text)


def _read_tsv(path: Path) -> list[Verse]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{path}: not UTF-8 text ({exc}); save it as UTF-8") from exc
    out = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t", 3)
        if number == 1 and tuple(f.strip().lower() for f in fields) == _HEADER:
            continue
        if len(fields) != 4:
            raise XlpeftValueError(f"{path}:{number}: a line can be book<TAB>chapter<TAB>verse<TAB>text; "
                                   f"got {len(fields)} tab-separated field(s)")
        out.append(_verse(*fields, where=f"{path}:{number}"))
    return out


def _read_chapter(path: Path) -> list[Verse]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path}: not a UTF-8 JSON chapter ({exc})") from exc
    if not isinstance(data, dict) or not {"book", "chapter", "verses"} <= set(data):
        raise XlpeftValueError(f"{path}: a chapter file can be an object with keys book, chapter, verses; "
                               f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    verses = data["verses"]
    if isinstance(verses, dict):
        pairs = list(verses.items())
    elif isinstance(verses, list) and all(isinstance(v, dict) and {"verse", "text"} <= set(v) for v in verses):
        pairs = [(v["verse"], v["text"]) for v in verses]
    else:
        raise XlpeftValueError(f"{path}: `verses` can be {{\"16\": text, …}} or [{{\"verse\": 16, \"text\": …}}, …]")
    return [_verse(data["book"], data["chapter"], verse, text, where=str(path)) for verse, text in pairs]


def read_bible(path: str | Path) -> list[Verse]:
    """Cleaned verses of a user's Bible (TSV file or folder of JSON chapters), in canonical order.

    Every verse key may occur once; a duplicate is an error naming both places
    rather than a silent overwrite (two verses with one key would break alignment).
    """
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted(root.rglob("*.json"))
        if not files:
            raise XlpeftValueError(f"{root}: a Bible folder can hold JSON chapter files (*.json); found none")
        raw = [(v, str(f)) for f in files for v in _read_chapter(f)]
    elif root.is_file():
        raw = [(v, str(root)) for v in _read_tsv(root)]
    else:
        raise XlpeftValueError(f"{root}: no such Bible file or folder; give a book<TAB>chapter<TAB>verse<TAB>text "
                               "file or a folder of JSON chapters")
    seen: dict[tuple[int, int, int], str] = {}
    out = []
    for verse, where in raw:
        key = verse[:3]
        if key in seen:
            raise XlpeftValueError(f"{where}: verse {USFM_BOOKS[key[0] - 1]} {key[1]}:{key[2]} occurs twice "
                                   f"(also in {seen[key]}); keep one")
        seen[key] = where
        text = clean_verse(verse.text)
        if text:
            out.append(verse._replace(text=text))
    if not out:
        raise XlpeftValueError(f"{root}: holds no verse with text")
    return sorted(out, key=lambda v: v[:3])
