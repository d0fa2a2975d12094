"""Santali (``sat``) in Ol Chiki script, from Firefox's Santali language pack.

Source: the Debian package ``firefox-esr-l10n-sat`` (Mozilla localisation,
MPL-2.0). The ``.deb`` holds a ``.xpi`` (zip) whose Fluent ``.ftl`` files and
``.properties`` files carry ~9,000 UI strings written in Ol Chiki
(U+1C50–U+1C7F), a script multilingual-e5-small's vocabulary lacks.

    apt-get download firefox-esr-l10n-sat ─► .deb (ar) ─► data.tar.xz ─► .xpi (zip)
        ─► .ftl / .properties message values ─► placeables removed ─► lines
        ─► hash split (90/5/5 by line) ─► <cache>/santali/{train,validation,test}.txt

Nothing is downloaded unless ``fetch=True`` (or ``fetch_santali()``) is asked.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

from xlpeft.data._common import MissingFileError, check_split, hash_split, read_utf8, split_lines
from xlpeft.errors import CorruptFileError, XlpeftError

PACKAGE = "firefox-esr-l10n-sat"
OL_CHIKI = (0x1C50, 0x1C7F)
"""Unicode block of the Ol Chiki script."""
FETCH_COMMAND = f"apt-get download {PACKAGE}"

__all__ = ["FETCH_COMMAND", "PACKAGE", "export_santali", "fetch_santali", "ftl_values", "is_ol_chiki", "santali_dir",
           "santali_lines", "santali_text", "write_santali_splits"]


class FetchError(XlpeftError, RuntimeError):
    """apt-get is missing or could not download the package."""


def santali_dir(cache: str | Path | None = None) -> Path:
    """Where the package and the split text files are cached."""
    from xlpeft.backbones.embedded import default_cache_dir
    return Path(cache) if cache is not None else default_cache_dir() / "santali"


def fetch_santali(cache: str | Path | None = None) -> Path:
    """Download the ``.deb`` into the cache with apt-get (once); returns its path."""
    folder = santali_dir(cache)
    found = sorted(folder.glob(f"{PACKAGE}_*.deb"))
    if found:
        return found[-1]
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None:
        raise FetchError(f"fetching Santali needs apt-get (Debian/Ubuntu); it is not installed. "
                         f"On a Debian machine run `{FETCH_COMMAND}` and put the .deb in {folder}")
    proc = subprocess.run(["apt-get", "download", PACKAGE], cwd=folder, capture_output=True, text=True)
    found = sorted(folder.glob(f"{PACKAGE}_*.deb"))
    if proc.returncode != 0 or not found:
        raise FetchError(f"`{FETCH_COMMAND}` failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}. "
                         f"Check the network and `apt-get update`, or put the .deb in {folder} yourself")
    return found[-1]


def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (the container of a ``.deb``)."""
    if not data.startswith(b"!<arch>\n"):
        raise CorruptFileError("not a .deb (ar) archive: bad magic; delete it and fetch again")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    return out


def xpi_texts(deb: Path) -> dict[str, str]:
    """The ``.ftl`` and ``.properties`` files inside the package's ``.xpi``, by path."""
    members = _ar_members(deb.read_bytes())
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise CorruptFileError(f"{deb}: no data.tar member; delete it and fetch again")
    with tarfile.open(fileobj=io.BytesIO(members[data_name])) as tar:
        xpi = next((m for m in tar.getmembers() if m.name.endswith(".xpi")), None)
        if xpi is None:
            raise CorruptFileError(f"{deb}: no .xpi language pack inside")
        blob = tar.extractfile(xpi).read()
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return {n: z.read(n).decode("utf-8") for n in sorted(z.namelist())
                if n.endswith((".ftl", ".properties"))}


_PLACEABLE = re.compile(r"\{[^{}]*\}")
_HTML = re.compile(r"<[^>]+>")
_FORMAT = re.compile(r"%(\d+\$)?[sSdu@]|&[a-z]+;|\$\w+")


def _clean(value: str) -> str:
    while _PLACEABLE.search(value):  # innermost first: nested select expressions collapse
        value = _PLACEABLE.sub(" ", value)
    value = _FORMAT.sub(" ", _HTML.sub(" ", value))
    return " ".join(value.replace("\\n", " ").split())


def ftl_values(text: str) -> list[str]:
    """Message and attribute values of a Fluent (or .properties) file, placeables removed."""
    values: list[str] = []
    current: list[str] | None = None
    for line in split_lines(text):
        if line.startswith("#") or not line.strip():
            current = None if not line.strip() else current
            continue
        if line[0] in " \t" and current is not None and not line.strip().startswith("."):
            current.append(line.strip())  # continuation of a multiline value
            continue
        head, sep, value = line.strip().partition("=")
        if not sep or not head.strip():
            continue
        current = [value.strip()]
        values.append(current)  # type: ignore[arg-type]
    return [v for v in (_clean(" ".join(parts)) for parts in values) if v]  # type: ignore[arg-type]


def is_ol_chiki(text: str, share: float = 0.5) -> bool:
    """True when at least ``share`` of the letters are Ol Chiki."""
    letters = [c for c in text if c.isalpha()]
    ol = sum(OL_CHIKI[0] <= ord(c) <= OL_CHIKI[1] for c in letters)
    return bool(letters) and ol / len(letters) >= share


def santali_lines(deb: Path) -> list[str]:
    """Distinct Ol Chiki lines of the language pack, in file order."""
    seen: dict[str, None] = {}
    for text in xpi_texts(deb).values():
        for value in ftl_values(text):
            if is_ol_chiki(value):
                seen.setdefault(value, None)
    return list(seen)


def write_santali_splits(cache: str | Path | None = None, fetch: bool = False) -> Path:
    """Parse the cached ``.deb`` into ``train/validation/test.txt`` (once); returns the folder."""
    folder = santali_dir(cache)
    if all((folder / f"{s}.txt").is_file() for s in ("train", "validation", "test")):
        return folder
    debs = sorted(folder.glob(f"{PACKAGE}_*.deb"))
    if not debs and not fetch:
        raise MissingFileError(f"the Santali corpus is not cached in {folder}; call "
                               f"santali_text(..., fetch=True) or run `{FETCH_COMMAND}` in that folder")
    deb = debs[-1] if debs else fetch_santali(folder)
    splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for line in santali_lines(deb):
        splits[hash_split(line)].append(line)
    for split, lines in splits.items():
        tmp = folder / f".{split}.txt.tmp"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(folder / f"{split}.txt")  # atomic: a half-written split is never read
    return folder


def santali_text(split: str = "train", max_lines: int | None = None, cache: str | Path | None = None,
                 fetch: bool = False) -> list[str]:
    """Lines of one split of the Santali (Ol Chiki) corpus."""
    check_split(split)
    folder = write_santali_splits(cache, fetch)
    lines = [x for x in split_lines(read_utf8(folder / f"{split}.txt", "Santali split file")) if x]
    return lines[:max_lines] if max_lines else lines


def export_santali(folder: str | Path, cache: str | Path | None = None, fetch: bool = False) -> tuple[Path, Path]:
    """Write ``sat.txt`` (train, validation, test in order) and ``sat.train.txt`` for ``MLMDataModule``.

    ``MLMDataModule(files={"sat": "sat.txt"})`` cuts its validation and test
    from the last 10 % of the file; ``sat.train.txt`` is exactly the part it
    trains on, so a vocabulary trained on it never sees held-out lines.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [x for s in ("train", "validation", "test") for x in santali_text(s, cache=cache, fetch=fetch)]
    cut = max(1, len(lines) // 20)
    paths = (folder / "sat.txt", folder / "sat.train.txt")
    for path, part in zip(paths, (lines, lines[:-2 * cut])):
        path.write_text("\n".join(part) + "\n", encoding="utf-8")
    return paths


if __name__ == "__main__":  # python -m xlpeft.data.santali runs/data  (fetches with apt-get)
    import sys
    print(*export_santali(sys.argv[1] if len(sys.argv) > 1 else "runs/data", fetch=True))
