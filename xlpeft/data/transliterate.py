"""Letter-for-letter transliteration into a script a vocabulary lacks (controlled experiment).

A new-script experiment on real data mixes two effects: the script is unseen
*and* the language is. Transliterating a Bible language the backbone knows
into another Unicode block keeps the language, the text and the word
boundaries and changes only the script, so "same text, own script" vs "same
text, unseen script" isolates what the new vocabulary has to recover.

    "Mungu akasema"  ─► lowercase, accents stripped ─► a→ᱚ, b→ᱛ, … ─► "ᱦᱮᱧᱠᱮ ᱚᱤᱚᱬᱞᱦᱚ"

The table is fixed (deterministic, invertible on lowercase ASCII letters).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from xlpeft.errors import XlpeftValueError

SCRIPTS: dict[str, int] = {"olck": 0x1C5A, "tfng": 0x2D30}
"""First letter of the target block per script code (Ol Chiki, Tifinagh); 26 letters follow."""

LATIN = "abcdefghijklmnopqrstuvwxyz"


def table(script: str = "olck") -> dict[str, str]:
    """The letter map a–z → 26 consecutive letters of ``script``'s block."""
    if script not in SCRIPTS:
        raise XlpeftValueError(f"`script` can be {', '.join(SCRIPTS)}; got {script!r}")
    start = SCRIPTS[script]
    return {c: chr(start + i) for i, c in enumerate(LATIN)}


def _fold(text: str) -> str:
    """Lowercase and strip accents (é → e), so every Latin letter has an image."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def transliterate(text: str, script: str = "olck") -> str:
    """``text`` with every Latin letter replaced by its ``script`` letter."""
    mapping = table(script)
    return "".join(mapping.get(c, c) for c in _fold(text))


def untransliterate(text: str, script: str = "olck") -> str:
    """Inverse of ``transliterate`` (up to case and accents)."""
    back = {v: k for k, v in table(script).items()}
    return "".join(back.get(c, c) for c in text)


def transliterate_all(lines: Iterable[str], script: str = "olck") -> list[str]:
    """``transliterate`` over lines."""
    return [transliterate(line, script) for line in lines]
