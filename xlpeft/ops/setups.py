"""Saved compositions: a trained fusion layer, or a whole setup with every file it needs.

    fusion dir   fusion_config.json        {"xlpeft_fusion": 1, "fuse": [a, b], "places": […], "backbone": …}
                 fusion_model.safetensors  "<place>.query.weight" …  (sha256 of data and config in its header)
    setup dir    setup_config.json         {"xlpeft_setup": 1, "setup": <blocks as JSON>, "adapters": […],
                                            "fusions": […], "files_sha256": {sub-directory weights: sha256}, …}
                 setup_checksums.safetensors   no tensors; its header holds setup_config.json's sha256
                 adapters/<name>/          an adapter directory (``save_adapter``)
                 fusions/<a+b>/            a fusion directory (``save_fusion``)
                 xlpeft_artefact.json      the manifest of what xlpeft wrote

Why a whole directory: a ``Fuse`` is useless without the adapters it was trained
over, and a ``Stack`` without its order. Each part keeps the guarantees of an
adapter file (atomic replacement, foreign destinations refused, checked headers,
sha256 chained from the setup's header down to every tensor), and a load checks
everything it can before it changes the model and undoes what it added on any
error. Blocks serialise as ``{"block": "Stack", "children": [...]}`` (``Average``
adds ``weights``, ``BatchSplit`` ``batch_sizes``). Per-point weight providers
(``set_average_weights``) are code, not data, and are not saved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from xlpeft.core.composition import Average, BatchSplit, Block, Fuse, Parallel, Setup, Stack, fusions, leaves, validate
from xlpeft.core.points import SublayerPoint
from xlpeft.errors import CorruptFileError, IncompatibleAdapterError, XlpeftError, XlpeftTypeError, XlpeftValueError
from xlpeft.methods.fusion import Fusion
from xlpeft.ops.artefacts import ArtefactKind, atomic_directory, destination
from xlpeft.ops.files import check_compatible, read_config, save_adapter, write_directory
from xlpeft.ops.weights import config_bytes, open_weights, sha256, weights_bytes

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel

__all__ = ["FUSION", "SETUP", "load_fusion", "load_setup", "save_fusion", "save_setup", "setup_from_json",
           "setup_to_json"]

FUSION_CONFIG, FUSION_WEIGHTS = "fusion_config.json", "fusion_model.safetensors"
SETUP_CONFIG, SETUP_CHECKSUMS = "setup_config.json", "setup_checksums.safetensors"
FORMAT_VERSION = 1
FUSION = ArtefactKind("fusion", FUSION_CONFIG, (FUSION_CONFIG, FUSION_WEIGHTS),
                      lambda m: isinstance(m, dict) and "fuse" in m and "backbone" in m)
SETUP = ArtefactKind("setup", SETUP_CONFIG, None,
                     lambda m: isinstance(m, dict) and "setup" in m and "backbone" in m)
_BLOCKS = {"Stack": Stack, "Fuse": Fuse, "Average": Average, "BatchSplit": BatchSplit, "Parallel": Parallel}


# --------------------------------------------------------------------------- setups as JSON


def setup_to_json(setup: Setup) -> Any:
    """A setup as JSON-ready data (an adapter name stays a string)."""
    if isinstance(setup, str):
        return setup
    if not isinstance(setup, Block) or type(setup).__name__ not in _BLOCKS:
        raise XlpeftTypeError(f"a setup can be an adapter name, Stack, Fuse, Average, BatchSplit or Parallel; "
                              f"got {type(setup).__name__}")
    out: dict[str, Any] = {"block": type(setup).__name__, "children": [setup_to_json(c) for c in setup.children]}
    if isinstance(setup, Average):
        out["weights"] = list(setup.weights)
    if isinstance(setup, BatchSplit):
        out["batch_sizes"] = list(setup.batch_sizes)
    return out


def setup_from_json(data: Any, where: str = "setup") -> Setup:
    """Invert ``setup_to_json``; anything malformed raises ``CorruptFileError`` naming ``where``."""
    try:
        setup = _parse(data)
        validate(setup)
    except (XlpeftError, TypeError, ValueError) as err:
        if isinstance(err, CorruptFileError):
            raise
        raise CorruptFileError(f"{where}: `setup` is not a valid composition ({err}); save the setup again") from err
    return setup


def _parse(data: Any) -> Setup:
    if isinstance(data, str):
        return data
    fields = {"block", "children", "weights", "batch_sizes"}
    if not (isinstance(data, dict) and data.get("block") in _BLOCKS and isinstance(data.get("children"), list)
            and set(data) <= fields):
        raise XlpeftValueError(f"a block can be {{'block': one of {sorted(_BLOCKS)}, 'children': [...]}}; "
                               f"got {str(data)[:80]}")
    children = [_parse(c) for c in data["children"]]
    kind = _BLOCKS[data["block"]]
    if kind is Average:
        weights = data.get("weights")
        if not (isinstance(weights, list) and all(type(w) in (int, float) for w in weights)):
            raise XlpeftValueError(f"Average `weights` can be a list of numbers; got {str(weights)[:80]}")
        block = Average(*children, weights=weights)
        block.weights = tuple(float(w) for w in weights)  # exactly as saved: the constructor renormalises
        return block
    if kind is BatchSplit:
        sizes = data.get("batch_sizes")
        if not (isinstance(sizes, list) and all(type(b) is int for b in sizes)):
            raise XlpeftValueError(f"BatchSplit `batch_sizes` can be a list of ints; got {str(sizes)[:80]}")
        return BatchSplit(*children, batch_sizes=sizes)
    return kind(*children)


# --------------------------------------------------------------------------- fusions


def _fusion_points(model: AdaptedModel, fuse: Fuse) -> dict[str, SublayerPoint]:
    """Place key → the points where ``fuse`` has (or would get) a fusion layer."""
    return {p.key: p for p in model.points.values()
            if isinstance(p, SublayerPoint) and any(c in p.adapters for c in fuse.children)}


def _check_fuse(model: AdaptedModel, fuse: Any) -> dict[str, SublayerPoint]:
    if not isinstance(fuse, Fuse):
        raise XlpeftTypeError(f"`fuse` can be a Fuse block; got {type(fuse).__name__} {fuse!r}")
    model.require_adapters(*fuse.children)
    points = _fusion_points(model, fuse)
    missing = sorted(k for k, p in points.items() if fuse.key not in p.fusions)
    if not points or missing:
        raise XlpeftValueError(f"{fuse!r} has no fusion layer at {missing[:3] or 'any place'}; make them with "
                               "set_active, train_adapters or add_fusion (and train them) before saving")
    return points


def save_fusion(model: AdaptedModel, fuse: Fuse, path: str | os.PathLike) -> Path:
    """Write ``fuse``'s fusion layers (every place) as a fusion directory; returns the path."""
    points = _check_fuse(model, fuse)
    tensors = {f"{place}.{k}": v.detach().contiguous().cpu()
               for place, point in sorted(points.items()) for k, v in point.fusions[fuse.key].state_dict().items()}
    meta = {"xlpeft_fusion": FORMAT_VERSION, "fuse": list(fuse.children), "places": sorted(points),
            "backbone": model.backbone_info()}
    return write_directory(path, meta, tensors, FUSION_CONFIG, FUSION_WEIGHTS, kind=FUSION)


def _version(meta: dict[str, Any], field: str, file: Path) -> None:
    if meta.get(field) != FORMAT_VERSION:
        raise IncompatibleAdapterError(f"`{field}` can be {FORMAT_VERSION} for this xlpeft; got "
                                       f"{str(meta.get(field))[:40]} in {file}; upgrade xlpeft to read it")


def load_fusion(model: AdaptedModel, path: str | os.PathLike, verify: bool = True,
                is_trainable: bool = False) -> Fuse:
    """Load a fusion directory over adapters already in ``model``; returns its ``Fuse``.

    Replaces the values of fusion layers that exist; on any error those are
    restored and new ones removed. Loaded layers are frozen unless ``is_trainable``.
    """
    path = destination(path)
    meta = read_config(path, FUSION_CONFIG, what="fusion")
    _version(meta, "xlpeft_fusion", path / FUSION_CONFIG)
    check_compatible(meta.get("backbone"), model, path, what="fusion")
    children = meta.get("fuse")
    if not (isinstance(children, list) and len(children) >= 2 and all(isinstance(c, str) for c in children)):
        raise CorruptFileError(f"{path / FUSION_CONFIG}: `fuse` can be a list of ≥ 2 adapter names; "
                               f"got {str(children)[:80]}")
    fuse = Fuse(*children)
    model.require_adapters(*fuse.children)
    points = _fusion_points(model, fuse)
    with torch.device("meta"):
        shapes = {f"{place}.{k}": tuple(v.shape) for place, p in points.items()
                  for k, v in Fusion(p.hidden).state_dict().items()}
    weights = open_weights(path, FUSION_WEIGHTS, "fusion")
    weights.check_shapes(shapes, "fusion")
    tensors = weights.load(verify, what="fusion")
    _install(model, fuse, points, tensors, is_trainable)
    return fuse


def _install(model: AdaptedModel, fuse: Fuse, points: dict[str, SublayerPoint],
             tensors: dict[str, torch.Tensor], is_trainable: bool) -> None:
    before = {k: {n: v.clone() for n, v in p.fusions[fuse.key].state_dict().items()}
              for k, p in points.items() if fuse.key in p.fusions}
    try:
        model.add_fusion(fuse)
        for place, point in points.items():
            layer = point.fusions[fuse.key]
            layer.load_state_dict({n[len(place) + 1:]: v for n, v in tensors.items() if n.startswith(place + ".")})
            if is_trainable:
                layer.requires_grad_(True)
    except BaseException:
        for place, point in points.items():
            if place in before:
                point.fusions[fuse.key].load_state_dict(before[place])
            elif fuse.key in point.fusions:
                del point.fusions[fuse.key]
        raise


# --------------------------------------------------------------------------- setups


def save_setup(model: AdaptedModel, setup: Setup, path: str | os.PathLike) -> Path:
    """Write ``setup``, each of its adapters and each of its fusion layers as one directory."""
    validate(setup, model.adapter_names)
    names, fuses = leaves(setup), list({f.key: f for f in fusions(setup)}.values())
    for fuse in fuses:
        _check_fuse(model, fuse)

    def write(tmp: Path) -> None:
        subs = [f"adapters/{n}" for n in names] + [f"fusions/{f.key}" for f in fuses]
        for name in names:
            save_adapter(model, name, tmp / "adapters" / name)
        for fuse in fuses:
            save_fusion(model, fuse, tmp / "fusions" / fuse.key)
        meta = {"xlpeft_setup": FORMAT_VERSION, "setup": setup_to_json(setup), "adapters": names,
                "fusions": [f.key for f in fuses], "backbone": model.backbone_info(),
                "files_sha256": {s: sha256((tmp / s / _weights_name(s)).read_bytes()) for s in subs}}
        files = {SETUP_CONFIG: config_bytes(meta)}
        (tmp / SETUP_CONFIG).write_bytes(files[SETUP_CONFIG])
        (tmp / SETUP_CHECKSUMS).write_bytes(weights_bytes({}, files))

    return atomic_directory(path, write, SETUP)


def _weights_name(sub: str) -> str:
    return "adapter_model.safetensors" if sub.startswith("adapters/") else FUSION_WEIGHTS


def load_setup(model: AdaptedModel, path: str | os.PathLike, set_active: bool = True,
               is_trainable: bool = False, verify: bool = True) -> Setup:
    """Load a ``save_setup`` directory into ``model`` (which must not hold its adapter names).

    Checks the setup's own checksums and the backbone first; adds every adapter and
    fusion layer, then activates the setup; on any error removes all it added.
    """
    path = destination(path)
    meta = read_config(path, SETUP_CONFIG, what="setup")
    _version(meta, "xlpeft_setup", path / SETUP_CONFIG)
    open_weights(path, SETUP_CHECKSUMS, "setup").load(verify, what="setup")
    check_compatible(meta.get("backbone"), model, path, what="setup")
    setup = setup_from_json(meta.get("setup"), str(path / SETUP_CONFIG))
    names, keys = leaves(setup), list({f.key: f for f in fusions(setup)})
    if meta.get("adapters") != names or meta.get("fusions") != keys:
        raise CorruptFileError(f"{path / SETUP_CONFIG}: `adapters`/`fusions` do not match `setup`; "
                               "the config is damaged, save the setup again")
    taken = [n for n in names if n in model.adapter_names]
    if taken:
        raise XlpeftValueError(f"this model already has adapters {taken}; load the setup into a model "
                               "without them, or delete_adapter them first")
    _check_subdirectories(path, meta, names, keys, verify)
    loaded: list[str] = []
    try:
        for name in names:
            loaded.append(model.load_adapter(path / "adapters" / name, name=name,
                                             is_trainable=is_trainable, verify=verify))
        for key in keys:
            load_fusion(model, path / "fusions" / key, verify=verify, is_trainable=is_trainable)
        if set_active:
            model.set_active(setup)
    except BaseException:
        for name in reversed(loaded):  # deleting an adapter also drops the fusions over it
            model.delete_adapter(name)
        raise
    return setup


def _check_subdirectories(path: Path, meta: dict[str, Any], names: list[str], keys: list[str],
                          verify: bool) -> None:
    recorded = meta.get("files_sha256")
    subs = [f"adapters/{n}" for n in names] + [f"fusions/{k}" for k in keys]
    if not isinstance(recorded, dict) or sorted(recorded) != sorted(subs):
        raise CorruptFileError(f"{path / SETUP_CONFIG}: `files_sha256` does not list {subs}; "
                               "the config is damaged, save the setup again")
    for sub in subs:
        file = path / sub / _weights_name(sub)
        if not file.is_file():
            raise XlpeftValueError(f"{path} has no {sub}/{file.name}; the setup directory is incomplete, "
                                   "save it again")
        if verify and sha256(file.read_bytes()) != recorded[sub]:
            raise CorruptFileError(f"{file} does not match the sha256 recorded in {SETUP_CONFIG} (it changed "
                                   "after the setup was saved); save the setup again, or pass verify=False")
