"""Artefact directories that never destroy data: atomic replacement, refusal of foreign paths.

    save(path):  check path ─► write everything into  .<name>.xlpeft-new-<pid>-<tid>-<hex>/
                 ─► renameat2(tmp, path, RENAME_EXCHANGE)   one syscall: path is old, then new
                 ─► remove tmp (which now holds the old copy)

Why the exchange and not a pointer to versioned folders: ``path`` stays a plain
directory holding exactly the files other tools expect (HF PEFT reads
``adapter_config.json`` there), and on Linux (ext4, xfs, btrfs, tmpfs, overlayfs)
one ``renameat2`` swaps two directories atomically, so at every instant ``path``
holds the complete old or the complete new artefact. Where the call is missing or
the file system refuses it, the fallback is two renames through
``.<name>.xlpeft-old-…``; a kill between them leaves ``path`` missing for an
instant, and the next save or load of ``path`` puts the old copy back.

A destination that exists is replaced only if it is an xlpeft artefact of the same
kind holding nothing xlpeft did not write; anything else (a project folder, the
working directory, a regular file) is refused before anything on disk changes.
Leftover temporaries of killed saves are removed by the next save or load of that
path (those of live processes are left alone). Directories follow the umask.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xlpeft.errors import ArtefactPathError, FileAccessError, XlpeftTypeError

MANIFEST = "xlpeft_artefact.json"
"""Lists the files of a save whose names vary (model directories); fixed kinds need none."""
_TAG = ".xlpeft-"
_RENAME_EXCHANGE, _RENAME_NOREPLACE, _AT_FDCWD = 2, 1, -100
_NAME_MAX, _PATH_MAX = 255, 4096


@dataclass(frozen=True)
class ArtefactKind:
    """What a save of one kind writes, so it can tell its own directory from anything else."""

    name: str
    """Shown in messages: ``adapter``, ``generator``, ``vocabulary``, ``model`` …"""
    marker: str
    """The JSON file every directory of this kind holds."""
    files: tuple[str, ...] | None = None
    """Every file name a save writes; ``None``: names vary, a ``MANIFEST`` lists them."""
    recognise: Callable[[Any], bool] = field(default=lambda meta: isinstance(meta, dict), compare=False)
    """True when the marker's JSON content is this kind's."""


MODEL = ArtefactKind("model", "config.json", None, lambda m: isinstance(m, dict) and "model_type" in m)
"""A Hugging Face model directory (``save_pretrained`` + tokenizer), e.g. a merged export."""


# --------------------------------------------------------------------------- paths


def destination(path: Any) -> Path:
    """``path`` checked and made absolute (symlinks resolved); bad names raise ``ArtefactPathError``."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise XlpeftTypeError(f"a path can be a str or os.PathLike; got {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text:
        raise ArtefactPathError(f"a path can be a non-empty str; got {text!r}")
    if "\x00" in text:
        raise ArtefactPathError(f"a path cannot contain a NUL character; got {text[:80]!r}")
    if len(os.fsencode(text)) > _PATH_MAX or any(len(os.fsencode(p)) > _NAME_MAX for p in Path(text).parts):
        raise ArtefactPathError(f"a path can have names of ≤ {_NAME_MAX} bytes and ≤ {_PATH_MAX} in all; "
                                f"got {text[:60]!r}… ({len(text)} characters)")
    try:
        return Path(os.path.realpath(text))
    except (OSError, ValueError) as err:
        raise ArtefactPathError(f"cannot resolve {text[:80]!r} ({err})") from err


def _read_json(file: Path) -> Any:
    try:
        if file.stat().st_size > 16 << 20:
            return None
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def _foreign(path: Path, kind: ArtefactKind) -> str | None:
    """Why the existing ``path`` is not replaceable as ``kind`` (None: it is ours)."""
    if not path.is_dir():
        return "is a file, not a directory"
    here = Path.cwd().resolve()
    if path == here or path in here.parents:
        return "is the working directory (or holds it)"
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return None  # an empty directory holds nothing to lose
    shown = f"{', '.join(entries[:5])}{' …' if len(entries) > 5 else ''}"
    meta = _read_json(path / kind.marker) if kind.marker else None
    if meta is None or not kind.recognise(meta):
        return f"holds {shown} but no xlpeft {kind.name} ({kind.marker or 'marker'} missing or not one)"
    if kind.files is not None:
        owned = set(kind.files)
    else:
        manifest = _read_json(path / MANIFEST)
        if not (isinstance(manifest, dict) and manifest.get("kind") == kind.name
                and isinstance(manifest.get("files"), list)):
            return f"has no {MANIFEST} listing what xlpeft wrote"
        owned = {str(f).split("/")[0] for f in manifest["files"]} | {MANIFEST}
    stray = [e for e in entries if e not in owned]
    if stray:
        return f"holds {', '.join(stray[:5])}{' …' if len(stray) > 5 else ''}, which xlpeft did not write"
    return None


def check_replaceable(path: Path, kind: ArtefactKind | None) -> None:
    """Refuse a destination whose replacement could destroy something xlpeft did not write."""
    if path.parent == path:
        raise ArtefactPathError(f"cannot save to the root directory {path}; pass a new directory path")
    if not os.path.lexists(path):
        return
    empty = ArtefactKind("artefact", "", ())  # kind None: only an empty directory may be replaced
    why = _foreign(path, kind or empty)
    if why is not None and kind is None and "no xlpeft" in why:
        why = "exists and is not empty"
    if why is not None:
        what = kind.name if kind else "artefact"
        article = "an" if what[0] in "aeiou" else "a"
        raise ArtefactPathError(f"{path} {why}; xlpeft replaces only {article} {what} directory it wrote. "
                                "Pass a new path (e.g. a subdirectory) or move it away first")


# --------------------------------------------------------------------------- renames


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2``; False where the platform or file system lacks it (caller falls back)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the complete ``tmp`` at ``path``; afterwards ``tmp`` holds the old copy (or nothing)."""
    if not os.path.lexists(path):
        try:
            if _renameat2(tmp, path, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            pass  # created meanwhile: exchange below
        else:
            if not os.path.lexists(path):
                os.rename(tmp, path)
                return
    if _renameat2(tmp, path, _RENAME_EXCHANGE):
        return
    old = _sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    os.rename(old, tmp)


# --------------------------------------------------------------------------- leftovers


def _stem(path: Path) -> str:
    """``.<name>.xlpeft-``: the prefix of ``path``'s temporaries (long names shortened, still unique)."""
    name = path.name
    if len(name) > 64:
        name = f"{name[:48]}~{hashlib.sha1(os.fsencode(name)).hexdigest()[:12]}"
    return f".{name}{_TAG}"


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f"{_stem(path)}{tag}-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int, tid: int, mtime: float) -> bool:
    """Whether the save that made a leftover may still be running."""
    if pid == os.getpid():
        return tid != threading.get_ident() and tid in {t.ident for t in threading.enumerate()}
    if os.name != "posix":
        return time.time() - mtime < 3600
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(path: Path) -> None:
    """Tidy after killed saves of ``path``: restore a missing copy, remove dead temporaries."""
    try:
        leftovers = [p for p in path.parent.iterdir() if p.name.startswith(_stem(path))]
    except OSError:
        return
    dead = []
    for p in leftovers:
        try:
            tag, pid, tid, _ = p.name[len(_stem(path)):].split("-")
            if not _alive(int(pid), int(tid), p.lstat().st_mtime):
                dead.append((tag, p))
        except (ValueError, OSError):
            continue
    if not os.path.lexists(path):  # only the two-rename fallback leaves this: put the old copy back
        for tag, p in dead:
            if tag == "old":
                try:
                    os.rename(p, path)
                    break
                except OSError:
                    continue
    for _, p in dead:
        if p.exists() and p != path:
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- writer


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _write_manifest(tmp: Path, kind: ArtefactKind) -> None:
    files = sorted(str(p.relative_to(tmp)).replace(os.sep, "/") for p in tmp.rglob("*") if p.is_file())
    (tmp / MANIFEST).write_text(json.dumps({"kind": kind.name, "files": files}, indent=1), encoding="utf-8")


def atomic_directory(path: str | os.PathLike, write: Callable[[Path], None],
                     kind: ArtefactKind | None = None) -> Path:
    """Call ``write(tmpdir)``, then make ``tmpdir`` the directory ``path`` in one atomic step.

    ``kind`` says what may be replaced: an existing ``path`` must be a ``kind``
    directory xlpeft wrote (``None``: only a new or empty ``path``). On any error,
    Ctrl-C included, ``path`` is left as it was. Returns the resolved path.
    """
    path = destination(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover(path)
        check_replaceable(path, kind)
        tmp = _sibling(path, "new")
        os.mkdir(tmp)  # mode 0o777 & ~umask, unlike mkdtemp's 0o700
    except OSError as err:
        raise FileAccessError(err.errno, f"cannot save to {path}: {err.strerror or err}") from err
    swapped = False
    try:
        write(tmp)
        if kind is not None and kind.files is None:
            _write_manifest(tmp, kind)
        _fsync_tree(tmp)
        check_replaceable(path, kind)  # the destination may have changed while writing
        _swap_in(tmp, path)
        swapped = True
    except OSError as err:
        raise FileAccessError(err.errno, f"cannot save to {path}: {err.strerror or err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new copy on failure, the old one after a swap
        if not swapped and not os.path.lexists(path):
            recover(path)
    return path
