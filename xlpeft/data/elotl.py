"""Spanish–indigenous parallel corpora from the ``elotl`` package (Mexico).

``elotl/corpora/<name>.csv`` files have no header; columns are
``spanish, other, variety, document, ...``:

- ``axolotl``: Spanish–Nahuatl, 16,111 rows; column 5 is the variety's ISO 639-3
  code (``nci``, ``azz``, ``nhm``, ``nhn``, ``nhw``, ``nhe``; empty for 2,157).
- ``tsunkua``: Spanish–Otomí, 4,963 rows; variety as "Otomí del Mezquital (ote)".
- ``kolo``: Spanish–Mixtec, 1,710 rows; variety as "Mixteco de Chalcatongo (mig)".

Which card each corpus belongs to comes from the language cards.
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass

from xlpeft.data._common import cards_with, collapse_spaces, corpus_path
from xlpeft.errors import CorruptFileError, XlpeftValueError, unknown

_CODE_IN_PARENS = re.compile(r"\(([a-z]{3})\)")


@dataclass(frozen=True)
class ElotlRow:
    """One aligned sentence pair with its variety code and source document."""

    es: str
    other: str
    variety: str
    document: str


def elotl_corpora() -> dict[str, str]:
    """Corpus name → card code of its non-Spanish side, e.g. ``{"axolotl": "nah"}``."""
    return {c.edition: lang.code for lang, c in cards_with("elotl") if lang.code != "spa"}


def _variety(row: list[str]) -> str:
    """ISO 639-3 code of the row's variety, "" when the corpus leaves it blank."""
    if len(row) >= 5 and re.fullmatch(r"[a-z]{3}", row[4].strip()):
        return row[4].strip()
    found = _CODE_IN_PARENS.search(row[2])
    return found.group(1) if found else ""


@functools.lru_cache(maxsize=8)
def _read(path: str) -> tuple[ElotlRow, ...]:
    """Rows with both sides non-empty; malformed rows raise with their line number."""
    rows: list[ElotlRow] = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        for row in reader:
            if len(row) < 4:
                raise CorruptFileError(
                    f"{path}:{reader.line_num}: an elotl row has at least 4 columns "
                    f"(spanish, other, variety, document); got {len(row)}")
            es, other = collapse_spaces(row[0]), collapse_spaces(row[1])
            if es and other:
                rows.append(ElotlRow(es, other, _variety(row), row[3].strip()))
    if not rows:
        raise CorruptFileError(f"{path}: the corpus file is empty; reinstall `pip install elotl==0.1.1`")
    return tuple(rows)


def elotl_rows(name: str, variety: str | None = None) -> list[ElotlRow]:
    """All rows of a corpus, optionally only those of one variety (ISO 639-3 code)."""
    corpora = {c.edition: c for _, c in cards_with("elotl")}
    if name not in corpora:
        raise unknown("elotl corpus", name, corpora, hint="(each name is a CSV of the elotl package)")
    rows = _read(str(corpus_path(corpora[name])))
    if variety is None:
        return list(rows)
    present = sorted({r.variety for r in rows if r.variety})
    if variety not in present:
        raise XlpeftValueError(f"`variety` of {name!r} can be {', '.join(present)}; got {variety!r}")
    return [r for r in rows if r.variety == variety]


def elotl_pairs(name: str, variety: str | None = None) -> list[tuple[str, str]]:
    """(Spanish, other-language) sentence pairs of a corpus."""
    return [(r.es, r.other) for r in elotl_rows(name, variety)]


def elotl_text(name: str, side: str = "other", variety: str | None = None) -> list[str]:
    """One side of a corpus as monolingual lines: ``"other"`` or ``"es"``."""
    if side not in ("other", "es"):
        raise XlpeftValueError(f"`side` can be other, es; got {side!r}")
    return [getattr(r, side) for r in elotl_rows(name, variety)]
