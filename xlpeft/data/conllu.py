"""A small CoNLL-U reader: word forms and UPOS tags, nothing else needed.

Enough for POS-tagging tasks without a new dependency. Comment lines feed
``sent_id`` and ``text``; multiword-token ranges (``1-2``) and empty nodes
(``1.1``) are skipped because their forms duplicate or add to the syntactic
words. A malformed line raises CorruptFileError naming the file and line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from xlpeft.data._common import MissingFileError, read_utf8, split_lines
from xlpeft.errors import CorruptFileError

_RANGE = re.compile(r"^\d+-\d+$")
_EMPTY_NODE = re.compile(r"^\d+\.\d+$")


@dataclass(frozen=True)
class Sentence:
    """One sentence: syntactic words and their universal POS tags."""

    forms: tuple[str, ...]
    upos: tuple[str, ...]
    sent_id: str = ""
    text: str = ""
    line: int = 0
    """1-based line number where the sentence starts (for error messages)."""


class _Builder:
    """Collects the lines of one sentence."""

    def __init__(self, line: int) -> None:
        self.line, self.forms, self.upos, self.meta = line, [], [], {}

    def build(self) -> Sentence:
        return Sentence(tuple(self.forms), tuple(self.upos), self.meta.get("sent_id", ""),
                        self.meta.get("text", ""), self.line)


def _comment(builder: _Builder, line: str) -> None:
    key, sep, value = line[1:].partition("=")
    if sep:
        builder.meta.setdefault(key.strip(), value.strip())


def _token(builder: _Builder, line: str, path: Path, lineno: int) -> None:
    cols = line.split("\t")
    if len(cols) != 10:
        raise CorruptFileError(
            f"{path}:{lineno}: a CoNLL-U token line has 10 tab-separated columns; got {len(cols)}: {line[:80]!r}")
    if _RANGE.match(cols[0]) or _EMPTY_NODE.match(cols[0]):
        return
    if not cols[0].isdigit() or int(cols[0]) < 1:
        raise CorruptFileError(
            f"{path}:{lineno}: the ID column can be a positive integer, a range 1-2 or an empty node 1.1; got {cols[0]!r}")
    builder.forms.append(cols[1])
    builder.upos.append(cols[3])


def iter_conllu(path: str | Path) -> Iterator[Sentence]:
    """Yield the sentences of a CoNLL-U file one by one."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"CoNLL-U file {path} does not exist; check the path")
    builder: _Builder | None = None
    for lineno, line in enumerate(split_lines(read_utf8(path, "CoNLL-U file")), 1):
        if not line.strip():
            if builder is not None and builder.forms:
                yield builder.build()
            builder = None
            continue
        builder = builder or _Builder(lineno)
        if line.startswith("#"):
            _comment(builder, line)
        else:
            _token(builder, line, path, lineno)
    if builder is not None and builder.forms:
        yield builder.build()


def read_conllu(path: str | Path) -> list[Sentence]:
    """All sentences of a CoNLL-U file; CorruptFileError if it holds none."""
    sentences = list(iter_conllu(path))
    if not sentences:
        raise CorruptFileError(f"{path}: no CoNLL-U sentences found (empty file or only comments)")
    return sentences
