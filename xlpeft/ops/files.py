"""Adapter files: a directory with ``adapter_config.json`` and
``adapter_model.safetensors``, written atomically, never pickled.

Loading checks that the file fits the backbone (family, width, depth,
vocabulary) and builds the adapter aside first, so a failed load leaves the
model exactly as it was. LoRA adapters also read and write HF PEFT's layout.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from xlpeft.errors import CorruptFileError, IncompatibleAdapterError, XlpeftValueError
from xlpeft.methods.base import config_from_dict

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def atomic_directory(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmpdir)`` then move the result to ``path`` by rename.

    An existing ``path`` is replaced only after the new content is complete; if
    the swap fails the old directory is put back, and no temp dirs are left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_adapter(model: AdaptedModel, name: str, path: str | os.PathLike,
                 format: str = "xlpeft") -> Path:
    """Save one adapter as a directory (``format="peft"`` for LoRA interop)."""
    if format == "peft":
        from xlpeft.ops.peft import save_peft
        return save_peft(model, name, path)
    if format != "xlpeft":
        raise XlpeftValueError(f"`format` can be 'xlpeft', 'peft'; got {format!r}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.adapter_state_dict(name).items()}
    meta = {
        "xlpeft_format": FORMAT_VERSION,
        "name": name,
        "config": model.configs[name].to_dict(),
        "backbone": model.backbone_info(),
    }

    return write_directory(path, meta, tensors)


def write_directory(path: str | os.PathLike, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    config_name: str = CONFIG_NAME, weights_name: str = WEIGHTS_NAME,
                    extra: dict[str, bytes] | None = None) -> Path:
    """Atomically write the JSON config + safetensors pair (plus ``extra`` files).

    Every xlpeft artefact (adapters, PEFT LoRA, generators, vocabularies) is
    this layout, so they share one writer and one atomicity guarantee.
    """
    def write(tmp: Path) -> None:
        for name, data in (extra or {}).items():
            (tmp / name).write_bytes(data)
        save_file(tensors, str(tmp / weights_name), metadata={"format": "pt"})
        (tmp / config_name).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")

    return atomic_directory(path, write)


def read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_NAME
    if not file.is_file():
        raise XlpeftValueError(
            f"{path} is not an adapter directory: {CONFIG_NAME} is missing; "
            "pass the directory that save_adapter wrote"
        )
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{file} is not valid JSON ({err}); the file is damaged") from err


def read_weights(path: Path, weights_name: str = WEIGHTS_NAME, what: str = "adapter") -> dict[str, torch.Tensor]:
    """The safetensors file of a ``what`` directory; missing or damaged files are named."""
    file = path / weights_name
    if not file.is_file():
        raise XlpeftValueError(f"{path} has no {weights_name}; the {what} directory is incomplete, save it again")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CorruptFileError(
            f"{file} is truncated or corrupted ({err}); save the {what} again"
        ) from err


def check_compatible(saved: dict[str, Any], model: AdaptedModel, path: Path) -> None:
    """Raise naming every field in which the file's backbone differs."""
    here = model.backbone_info()
    diffs = [f"{k}: file {saved.get(k)!r} vs model {here[k]!r}"
             for k in ("family", "hidden_size", "num_layers")
             if k in saved and saved.get(k) != here[k]]
    if saved.get("vocab_size") not in (None, here["vocab_size"]) and _has_vocab_part(saved):
        diffs.append(f"vocab_size: file {saved['vocab_size']} vs model {here['vocab_size']}")
    if diffs:
        raise IncompatibleAdapterError(
            f"adapter at {path} was trained for another backbone ({'; '.join(diffs)}); "
            "load it into the backbone it was trained with"
        )


def _has_vocab_part(saved: dict[str, Any]) -> bool:
    return bool(saved.get("has_vocab_part"))


def load_adapter(model: AdaptedModel, path: str | os.PathLike, name: str | None = None) -> str:
    """Load an adapter directory into ``model``; returns the adapter's name."""
    path = Path(path)
    meta = read_config(path)
    if isinstance(meta, dict) and "peft_type" in meta:
        from xlpeft.ops.peft import load_peft
        return load_peft(model, path, meta, name)
    if not isinstance(meta, dict) or "config" not in meta or not isinstance(meta.get("backbone"), dict):
        raise CorruptFileError(f"{path / CONFIG_NAME} lacks 'config'/'backbone'; not an xlpeft adapter")
    version = meta.get("xlpeft_format", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IncompatibleAdapterError(
            f"`xlpeft_format` can be 1..{FORMAT_VERSION} for this xlpeft; got {version!r} in "
            f"{path / CONFIG_NAME}; upgrade xlpeft to read it"
        )
    check_compatible(meta["backbone"], model, path)
    config = config_from_dict(meta["config"])
    tensors = read_weights(path)
    name = name or meta.get("name") or path.name
    model.add_adapter(name, config)
    try:
        model.load_adapter_state_dict(name, tensors)
    except Exception:
        model.delete_adapter(name)
        raise
    return name


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]],
                        weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted average of same-shaped state dicts (AdapterSoup).

    Sparsity masks (bool) are united: a weight any member kept stays kept; a
    member without a mask counts as keeping everything.
    """
    if not states:
        raise XlpeftValueError("average_state_dicts needs at least one state dict; got none")
    weights = [1.0 / len(states)] * len(states) if weights is None else [float(w) for w in weights]
    if len(weights) != len(states) or sum(weights) <= 0:
        raise XlpeftValueError(
            f"`weights` can be one number per adapter ({len(states)}) with a positive sum; got {weights}"
        )
    keys = {k for s in states for k in s}
    uneven = sorted(k for k in keys if not k.endswith("weight_mask") and any(k not in s for s in states))
    if uneven:
        raise XlpeftValueError(f"adapters to average hold different tensors (e.g. {uneven[:3]}); "
                               "only same-config adapters can be averaged")
    total = sum(weights)
    out = {}
    for key in sorted(keys):
        if key.endswith("weight_mask"):
            masks = [s[key].bool() if key in s else None for s in states]
            out[key] = (torch.stack([m for m in masks if m is not None]).any(0)
                        if all(m is not None for m in masks) else None)
            continue
        values = [s[key] for s in states]
        out[key] = sum(w / total * v.float() for w, v in zip(weights, values)).to(values[0].dtype)
    return {k: v for k, v in out.items() if v is not None}
