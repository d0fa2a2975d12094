"""Adapter files: a directory with ``adapter_config.json`` and
``adapter_model.safetensors``, written atomically, never pickled.

Saving never destroys data and replaces atomically (``xlpeft.ops.artefacts``);
the weights' header records sha256 checksums of the data and of the config
(``xlpeft.ops.weights``). Loading checks the config (types, ranges), the
backbone (family, width, depth, vocabulary), the header (dtypes, shapes) and
the checksums, builds the adapter aside first and removes it on any error, so
a failed load leaves the model exactly as it was. LoRA adapters also read and
write HF PEFT's layout; bottleneck, invertible, LoRA, prefix and Compacter adapters AdapterHub's
(``xlpeft.ops.adapterhub``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from xlpeft.errors import CorruptFileError, IncompatibleAdapterError, XlpeftValueError
from xlpeft.methods.base import config_from_dict
from xlpeft.ops.artefacts import MODEL, ArtefactKind, atomic_directory, destination, recover
from xlpeft.ops.weights import config_bytes, open_weights, read_json, weights_bytes

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel

__all__ = ["ADAPTER", "MODEL", "ArtefactKind", "atomic_directory", "check_compatible", "load_adapter",
           "read_config", "read_weights", "save_adapter", "write_directory"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 2
"""2: the weights' header holds sha256 checksums (1: none; still loadable, with a warning)."""
BACKBONE_FIELDS = ("family", "hidden_size", "num_layers")


def _is_adapter(meta: Any) -> bool:
    return isinstance(meta, dict) and ("peft_type" in meta or ("config" in meta and "backbone" in meta))


ADAPTER = ArtefactKind("adapter", CONFIG_NAME, (CONFIG_NAME, WEIGHTS_NAME), _is_adapter)


def save_adapter(model: AdaptedModel, name: str, path: str | os.PathLike,
                 format: str = "xlpeft") -> Path:
    """Save one adapter as a directory (``format="peft"``/``"adapters"``: HF PEFT / AdapterHub layouts)."""
    if format == "peft":
        from xlpeft.ops.peft import save_peft
        return save_peft(model, name, path)
    if format == "adapters":
        from xlpeft.ops.adapterhub import save_adapterhub
        return save_adapterhub(model, name, path)
    if format != "xlpeft":
        raise XlpeftValueError(f"`format` can be 'xlpeft', 'peft'; got {format!r} "
                               "(or 'adapters' for AdapterHub's layout)")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.adapter_state_dict(name).items()}
    meta = {
        "xlpeft_format": FORMAT_VERSION,
        "name": name,
        "config": model.configs[name].to_dict(),
        "backbone": model.backbone_info(),
    }
    if getattr(model.configs[name], "sparse", False):  # an SFT is a delta on these very weights
        from xlpeft.core.sft import theta_digest
        meta["backbone"]["sft_theta_sha256"] = theta_digest(model, name)
    return write_directory(path, meta, tensors)


def write_directory(path: str | os.PathLike, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    config_name: str = CONFIG_NAME, weights_name: str = WEIGHTS_NAME,
                    extra: dict[str, bytes] | None = None, kind: ArtefactKind = ADAPTER) -> Path:
    """Atomically write the JSON config + safetensors pair (plus ``extra`` files).

    Every xlpeft artefact (adapters, PEFT LoRA, generators, vocabularies) is this
    layout, so they share one writer, one atomicity guarantee and one checksum
    record (in the weights' header: the data and every other file).
    """
    files = {**(extra or {}), config_name: config_bytes(meta)}
    blob = weights_bytes(tensors, files)

    def write(tmp: Path) -> None:
        for file_name, data in files.items():
            (tmp / file_name).write_bytes(data)
        (tmp / weights_name).write_bytes(blob)

    return atomic_directory(path, write, kind)


def read_config(path: Path, config_name: str = CONFIG_NAME, what: str = "adapter") -> dict[str, Any]:
    """The config of a ``what`` directory (after tidying leftovers of killed saves of it)."""
    path = destination(path)
    recover(path)
    file = path / config_name
    if not file.is_file():
        raise XlpeftValueError(
            f"{path} is not {'an' if what[0] in 'aeiou' else 'a'} {what} directory: {config_name} is missing; "
            f"pass the directory that save_{what} wrote"
        )
    return read_json(file, what)


def read_weights(path: Path, weights_name: str = WEIGHTS_NAME, what: str = "adapter", verify: bool = True,
                 int_keys: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The checked tensors of a ``what`` directory; missing or damaged files are named."""
    return open_weights(Path(path), weights_name, what, int_keys).load(verify, what=what)


def check_compatible(saved: Any, model: AdaptedModel, path: Path, what: str = "adapter") -> None:
    """Raise naming every field in which the file's backbone differs (or is absent)."""
    if not isinstance(saved, dict):
        raise CorruptFileError(f"{path}: `backbone` can be an object; got {type(saved).__name__}")
    here = model.backbone_info()
    need = BACKBONE_FIELDS + (("vocab_size",) if _has_vocab_part(saved) else ())
    absent = [k for k in need if k not in saved]
    if absent:
        raise CorruptFileError(f"{path}: the {what}'s `backbone` lacks {absent}, so it cannot be checked "
                               "against this model; the config is damaged, save it again")
    diffs = [f"{k}: file {_short(saved[k])} vs model {here[k]!r}" for k in need if saved[k] != here[k]]
    if diffs:
        raise IncompatibleAdapterError(
            f"{what} at {path} was trained for another backbone ({'; '.join(diffs)}); "
            "load it into the backbone it was trained with"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"


def _has_vocab_part(saved: dict[str, Any]) -> bool:
    return bool(saved.get("has_vocab_part"))


def _check_theta(model: AdaptedModel, name: str, saved: dict[str, Any], path: Path) -> None:
    """An SFT adds to the weights it was trained on: refuse other weights of the same shapes."""
    from xlpeft.core.sft import theta_digest
    recorded = saved.get("sft_theta_sha256")
    if recorded is not None and recorded != theta_digest(model, name):
        raise IncompatibleAdapterError(
            f"sparse fine-tuning at {path} was trained on other backbone weights (same shapes, different values "
            "at its entries, e.g. another checkpoint or merged adapters); load it into the backbone it was "
            "trained with, or pass verify=False to apply it anyway")


def load_adapter(model: AdaptedModel, path: str | os.PathLike, name: str | None = None,
                 verify: bool = True, allow_nonfinite: bool = False, hub: dict[str, Any] | None = None) -> str:
    """Load an adapter directory (or Hub repo id: ``xlpeft.ops.hub``) into ``model``; returns its name.

    ``verify=False`` skips the sha256 checks; ``allow_nonfinite`` lets NaN/inf weights in; ``hub``
    holds ``revision``/``cache_dir``/``local_files_only``/``token`` for a repo id.
    """
    from xlpeft.ops.hub import adapter_folder
    path = destination(adapter_folder(path, hub))
    meta = read_config(path)
    if "peft_type" in meta:
        from xlpeft.ops.peft import load_peft
        return load_peft(model, path, meta, name, verify=verify)
    from xlpeft.ops.adapterhub import is_adapterhub, load_adapterhub
    if is_adapterhub(meta):
        return load_adapterhub(model, path, meta, name, verify=verify)
    if "config" not in meta or "backbone" not in meta:
        raise CorruptFileError(f"{path / CONFIG_NAME} lacks 'config'/'backbone'; not an xlpeft adapter")
    version = meta.get("xlpeft_format", 1)
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise IncompatibleAdapterError(
            f"`xlpeft_format` can be 1..{FORMAT_VERSION} for this xlpeft; got {_short(version)} in "
            f"{path / CONFIG_NAME}; upgrade xlpeft to read it"
        )
    check_compatible(meta["backbone"], model, path)
    config = config_from_dict(meta["config"])
    sparse = getattr(config, "sparse", False)
    weights = open_weights(path, WEIGHTS_NAME, int_keys={f"{p}.indices": "I64" for p in config.params}
                           if sparse else None)
    name = meta.get("name") if name is None else name
    if name is None:
        name = path.name
    model.add_adapter(name, config)
    try:
        expected = {k: tuple(v.shape) for k, v in model.adapter_state_dict(name).items()}
        weights.check_shapes(expected, "adapter")
        tensors = weights.load(verify, allow_nonfinite)
        model.load_adapter_state_dict(name, tensors)
        if sparse and verify:
            _check_theta(model, name, meta["backbone"], path)
    except BaseException:
        model.delete_adapter(name)
        raise
    return name
