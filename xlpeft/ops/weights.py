"""Config JSON and safetensors files, checked before anything large is allocated.

    write:  config bytes ──sha256──┐
            tensors ─► safetensors ─► data section ──sha256──► header "__metadata__"
    read:   JSON (≤ 16 MiB, no NaN, no deep nesting) ─► header only (dtypes, shapes,
            offsets that tile the file) ─► caller compares shapes ─► whole file read once,
            checksums verified ─► tensors (finite floats; bool masks; int64 id maps)

The checksums live in the safetensors header, not in the config: a PEFT-layout
``adapter_config.json`` must stay exactly what PEFT reads, and one place covers every
kind (adapters, PEFT LoRA, generators, vocabularies), the config file included.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from xlpeft.errors import CorruptFileError, FileAccessError, XlpeftValueError, XlpeftWarning

DATA_SHA = "xlpeft_sha256"
"""Header metadata: sha256 of the data section (every tensor byte)."""
FILES_SHA = "xlpeft_files_sha256"
"""Header metadata: JSON ``{file name: sha256}`` of the other files of the directory."""
MAX_JSON = 16 << 20
_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_OTHER = {"BOOL": (torch.bool, 1), "I64": (torch.int64, 8)}
_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reject_constant(token: str) -> None:
    raise ValueError(f"{token} is not valid JSON")


def read_json(file: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``file``; damaged, huge, deeply nested or non-object content is refused."""
    try:
        size = file.stat().st_size
        if size > MAX_JSON:
            raise CorruptFileError(f"{file} is {size} bytes; a {what} config is at most {MAX_JSON} "
                                   "bytes: the file is damaged or not a config")
        data = json.loads(file.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        if isinstance(err, CorruptFileError):
            raise
        raise CorruptFileError(f"{file} is not valid JSON ({str(err)[:120]}); the file is damaged, "
                               f"save the {what} again") from err
    except OSError as err:
        raise FileAccessError(err.errno, f"cannot read {file}: {err.strerror or err}") from err
    if not isinstance(data, dict):
        raise CorruptFileError(f"{file} holds a JSON {type(data).__name__}, not an object; "
                               f"not an xlpeft {what} config")
    return data


def config_bytes(meta: dict[str, Any]) -> bytes:
    """The exact bytes a config is written as (hashed before writing)."""
    return json.dumps(meta, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")


def weights_bytes(tensors: dict[str, torch.Tensor], files: dict[str, bytes]) -> bytes:
    """A safetensors file whose header records the sha256 of its data and of ``files``."""
    first = st_save(tensors, metadata={"format": "pt"})
    n = struct.unpack("<Q", first[:8])[0]
    meta = {"format": "pt", DATA_SHA: sha256(first[8 + n:]),
            FILES_SHA: json.dumps({name: sha256(data) for name, data in sorted(files.items())})}
    return st_save(tensors, metadata=meta)


@dataclass
class WeightsFile:
    """A safetensors file whose header passed the checks; ``load`` reads the data."""

    file: Path
    header: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    size: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.header.items()}

    def check_shapes(self, expected: dict[str, tuple[int, ...]], what: str) -> None:
        """Keys and shapes equal to ``expected`` (masks: their weight's shape), before any data is read."""
        got = self.shapes()
        masks = {k: expected.get(k[: -len("_mask")]) for k in got if k.endswith("weight_mask") and k not in expected}
        want = {**expected, **{k: v for k, v in masks.items() if v is not None}}
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = [f"{k} {got[k]} vs {want[k]}" for k in sorted(set(got) & set(want)) if got[k] != tuple(want[k])]
        if missing or extra or wrong:
            raise CorruptFileError(
                f"{self.file} does not fit its config: missing {missing[:5]}, unexpected {extra[:5]}, "
                f"shapes (file vs expected) {wrong[:5]}; save the {what} again or load it into its backbone"
            )

    def load(self, verify: bool = True, allow_nonfinite: bool = False, what: str = "adapter",
             legacy_warning: bool = True) -> dict[str, torch.Tensor]:
        """Read the whole file once, verify its checksums, return the tensors."""
        try:
            blob = self.file.read_bytes()
        except OSError as err:
            raise FileAccessError(err.errno, f"cannot read {self.file}: {err.strerror or err}") from err
        if len(blob) != self.size:
            raise CorruptFileError(f"{self.file} changed while loading; load it again")
        if verify:
            self._verify(blob, what, legacy_warning)
        try:
            tensors = st_load(blob)
        except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
            raise CorruptFileError(f"{self.file} is truncated or corrupted ({err}); save the {what} again") from err
        if not allow_nonfinite:
            bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            if bad:
                raise CorruptFileError(f"{self.file} holds NaN or infinite values in {bad[:5]}; the {what} is "
                                       "damaged (or diverged in training): retrain or save it again")
        return tensors

    def _verify(self, blob: bytes, what: str, legacy_warning: bool) -> None:
        recorded = self.metadata.get(DATA_SHA)
        if recorded is None:
            if legacy_warning:
                warnings.warn(f"{self.file} has no xlpeft checksum (written by an older xlpeft or another "
                              f"tool); its integrity is not checked. Save the {what} again to add one",
                              XlpeftWarning, stacklevel=4)
            return
        n = struct.unpack("<Q", blob[:8])[0]
        if sha256(blob[8 + n:]) != recorded:
            raise CorruptFileError(f"{self.file} does not match its sha256 (the tensor data changed after it was "
                                   f"saved); the file is damaged: save the {what} again, or pass verify=False")
        try:
            files = json.loads(self.metadata.get(FILES_SHA, "{}"))
            items = list(files.items())
        except (ValueError, AttributeError) as err:
            raise CorruptFileError(f"{self.file} has a damaged `{FILES_SHA}` record; save the {what} again") from err
        for name, digest in items:
            other = self.file.parent / str(name)
            if os.sep not in str(name) and not other.is_file():
                raise XlpeftValueError(f"{self.file.parent} has no {name}; the {what} directory is incomplete, "
                                       "save it again")
            if os.sep in str(name) or sha256(other.read_bytes()) != digest:
                raise CorruptFileError(f"{other} does not match the sha256 recorded in {self.file.name} (it "
                                       f"changed after the {what} was saved); save it again, or pass verify=False")


def _corrupt(file: Path, why: str, what: str) -> CorruptFileError:
    return CorruptFileError(f"{file} is truncated or corrupted ({why}); save the {what} again")


def open_weights(path: Path, weights_name: str, what: str = "adapter",
                 int_keys: Mapping[str, str] | None = None) -> WeightsFile:
    """Parse and check only the header of ``path/weights_name``: dtypes, shapes, offsets.

    Tensors must be floating point, except ``*weight_mask`` (BOOL) and the keys of
    ``int_keys``, each with its one dtype (``{"piece_to_id": "I64"}``).
    """
    file = path / weights_name
    if not file.is_file():
        raise XlpeftValueError(f"{path} has no {weights_name}; the {what} directory is incomplete, save it again")
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(file, f"{size} bytes, shorter than a header", what)
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 100 << 20):
                raise _corrupt(file, f"header length {n} exceeds the file ({size} bytes)", what)
            raw = f.read(n)
    except OSError as err:
        raise FileAccessError(err.errno, f"cannot read {file}: {err.strerror or err}") from err
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise _corrupt(file, f"header is not JSON: {str(err)[:80]}", what) from err
    if not isinstance(header, dict):
        raise _corrupt(file, "header is not a JSON object", what)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(file, "header metadata is not a map of strings", what)
    _check_entries(file, header, size - 8 - n, dict(int_keys or {}), what)
    return WeightsFile(file, header, metadata, size)


def _check_entries(file: Path, header: dict[str, Any], data_size: int, int_keys: dict[str, str], what: str) -> None:
    spans = []
    for key, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)):
            raise _corrupt(file, f"entry {key[:80]!r} lacks dtype/shape/data_offsets", what)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype in _FLOATS:
            itemsize = _SIZES[dtype]
        elif dtype == "BOOL" and key.endswith("weight_mask") or int_keys.get(key) == dtype:
            itemsize = _OTHER[dtype][1]
        else:
            allowed = "F16, BF16, F32, F64 (BOOL for sparsity masks)"
            raise CorruptFileError(f"{file}: tensor {key[:80]!r} has dtype {dtype[:20]!r}; xlpeft loads "
                                   f"{allowed} and never casts silently. Convert it to float32 and save again")
        if not (all(type(d) is int and d >= 0 for d in shape) and len(offsets) == 2
                and all(type(o) is int for o in offsets)):
            raise _corrupt(file, f"entry {key[:80]!r} has a malformed shape or offsets", what)
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise _corrupt(file, f"entry {key[:80]!r}: shape {shape} does not fill its {offsets[1] - offsets[0]} bytes",
                           what)
        spans.append(tuple(offsets))
    spans.sort()
    end = 0
    for begin, stop in spans:
        if begin != end:
            raise _corrupt(file, "tensor data regions overlap or leave gaps", what)
        end = stop
    if end != data_size:
        raise _corrupt(file, f"tensors cover {end} of {data_size} data bytes", what)
