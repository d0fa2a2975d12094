"""Verse-aligned Quran texts from ``kaeshur-quran`` (Kashmiri, Urdu, English, Arabic).

The package ships one JSON file per surah (``001.json`` .. ``114.json``): the
Arabic in ``verses/`` (``verse_key`` "2:255", ``verse_content``) and each
translation in ``translations/<translator id>/`` (``verse_id``, ``translation``),
6,236 verses each. Translator ids per language are in the language cards.
Kashmiri translations carry inline commentary in ﴿…﴾ or (…); it is kept.

Splits hash blocks of ten verses, (surah, (ayah - 1) // 10), so neighbouring
verses stay together and the split is the same in every language.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

from xlpeft.data._common import cards_with, check_split, collapse_spaces, corpus_path, hash_split, pick_edition
from xlpeft.errors import CorruptFileError, XlpeftKeyError, unknown
from xlpeft.languages import Language, get_language

SURAHS = 114


class QuranVerse(NamedTuple):
    """One verse; (surah, ayah) aligns the texts of every language."""

    surah: int
    ayah: int
    text: str


def quran_languages() -> list[str]:
    """Card codes of the languages with a Quran text."""
    return sorted({lang.code for lang, _ in cards_with("quran")})


def _card(lang: str) -> Language:
    try:
        card = get_language(lang)
    except XlpeftKeyError:
        card = None
    if card is None or not any(c.source == "quran" for c in card.corpora):
        raise unknown("Quran language", str(lang), quran_languages(), hint="('ks' is accepted for 'kas')")
    return card


def _load(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{path}: not a readable kaeshur-quran JSON file ({exc})") from exc
    if not isinstance(data, list) or not data:
        raise CorruptFileError(f"{path}: expected a non-empty list of verses")
    return data


def _verse(surah: int, item: dict, path: Path) -> QuranVerse:
    try:
        if "verse_key" in item:
            return QuranVerse(surah, int(item["verse_key"].split(":")[1]), collapse_spaces(item["verse_content"]))
        return QuranVerse(surah, int(item["verse_id"]), collapse_spaces(item["translation"]))
    except (KeyError, ValueError, IndexError, AttributeError) as exc:
        raise CorruptFileError(f"{path}: malformed verse entry {str(item)[:80]} ({exc!r})") from exc


@functools.lru_cache(maxsize=8)
def _read(folder: str) -> tuple[QuranVerse, ...]:
    """All non-empty verses of one text (Arabic or a translation), in order."""
    out: list[QuranVerse] = []
    for surah in range(1, SURAHS + 1):
        path = Path(folder) / f"{surah:03d}.json"
        out += [_verse(surah, item, path) for item in _load(path)]
    return tuple(v for v in out if v.text)


def quran_verses(lang: str, edition: str | None = None) -> list[QuranVerse]:
    """Verses of a language's default translation, or of translator id ``edition``."""
    corpus = pick_edition(_card(lang), "quran", edition)
    return list(_read(str(corpus_path(corpus))))


def quran_block_split(surah: int, ayah: int) -> str:
    """Split of a verse: its block of ten verses decides, the same in every language."""
    return hash_split(f"quran:{surah}:{(ayah - 1) // 10}")


def quran_split(lang: str, split: str, edition: str | None = None) -> list[QuranVerse]:
    """Verses of ``split`` (see :func:`quran_block_split`)."""
    check_split(split)
    return [v for v in quran_verses(lang, edition) if quran_block_split(v.surah, v.ayah) == split]
