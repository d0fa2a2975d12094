"""One exception family for xlpeft.

Every error a user can trigger is an ``XlpeftError``; the subclasses also derive
from the matching builtin so ``except KeyError`` keeps working. Messages follow
"`x` can be A, B; got C" plus what to do about it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class XlpeftError(Exception):
    """Base class of every error raised on purpose by xlpeft."""


class XlpeftValueError(XlpeftError, ValueError):
    """A value is out of range, malformed or inconsistent."""


class XlpeftKeyError(XlpeftError, KeyError):
    """A name (adapter, preset, language, target) is unknown."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text.
        return str(self.args[0]) if self.args else ""


class XlpeftTypeError(XlpeftError, TypeError):
    """An object of the wrong kind was passed."""


class IncompatibleAdapterError(XlpeftValueError):
    """An adapter file or checkpoint was made for another backbone."""


class CorruptFileError(XlpeftValueError):
    """A file on disk is truncated, corrupted or not what it claims to be."""


class MissingDependencyError(XlpeftError, ImportError):
    """An optional package is needed for this feature."""


class ArtefactPathError(XlpeftValueError):
    """A save or load destination is unusable: not an artefact of this kind, a bad name, a file.

    Raised before anything on disk is touched, so the destination is left as it was.
    """


class FileAccessError(XlpeftError, OSError):
    """The operating system refused a read or write (permissions, disk full, read-only)."""


class XlpeftWarning(UserWarning):
    """Something was accepted but deserves attention (e.g. a file without a checksum)."""


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` candidates that look like ``name`` (for "did you mean")."""
    pool = sorted(set(candidates))
    hits = difflib.get_close_matches(name, pool, n=n, cutoff=0.5)
    if not hits:
        hits = [c for c in pool if name.lower() in c.lower()][:n]
    return hits


def unknown(kind: str, name: str, known: Iterable[str], hint: str = "") -> XlpeftKeyError:
    """Build the standard "unknown X" error listing what is known and close matches."""
    known = sorted(set(known))
    close = close_matches(name, known)
    shown = ", ".join(known[:30]) + (" …" if len(known) > 30 else "") if known else "(none)"
    msg = f"unknown {kind} {name!r}; known: {shown}"
    if close:
        msg += f". Did you mean {', '.join(repr(c) for c in close)}?"
    if hint:
        msg += f" {hint}"
    return XlpeftKeyError(msg)
