"""Generator checkpoints: a directory like an adapter's, checked against the backbone.

    generator_config.json   kind, GeneratorConfig, slots, backbone info
    generator_model.safetensors

Loading refuses a generator made for another backbone (family, width, depth,
slots), naming what differs, before anything is attached.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file

from xlpeft.errors import CorruptFileError, IncompatibleAdapterError, XlpeftValueError, unknown
from xlpeft.ops.files import write_directory

if TYPE_CHECKING:
    from xlpeft.generators.base import AdapterGenerator
    from xlpeft.core.model import AdaptedModel

CONFIG_NAME = "generator_config.json"
WEIGHTS_NAME = "generator_model.safetensors"


def generator_classes() -> dict[str, tuple[type, type]]:
    """Generator kind → (generator class, config class)."""
    from xlpeft.generators.hyperx import HyperXConfig, HyperXGenerator
    from xlpeft.generators.madg import MadGConfig, MadGGenerator
    return {"madg": (MadGGenerator, MadGConfig), "hyperx": (HyperXGenerator, HyperXConfig)}


def make_config(kind: str, **fields: Any) -> Any:
    """The config of a generator ``kind`` from plain values (lists become tuples)."""
    classes = generator_classes()
    if kind not in classes:
        raise unknown("generator kind", kind, classes)
    cls = classes[kind][1]
    names = {f.name for f in dataclasses.fields(cls)}
    for key in fields:
        if key not in names:
            raise unknown(f"field of {cls.__name__}", key, names)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def build_generator(kind: str, model: AdaptedModel, **fields: Any) -> AdapterGenerator:
    """A fresh generator of ``kind`` for ``model``'s places."""
    config = make_config(kind, **fields)  # checks the kind first
    return generator_classes()[kind][0].for_model(model, config)


def save_generator(generator: AdapterGenerator, path: str | Path) -> Path:
    """Write the generator's config and weights atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in generator.state_dict().items()}
    meta = {"kind": generator.kind, "config": generator.config.to_dict(), "slots": generator.slots,
            "hidden": generator.hidden, "backbone": generator.backbone}
    return write_directory(path, meta, tensors, CONFIG_NAME, WEIGHTS_NAME)


def load_generator(path: str | Path, model: AdaptedModel) -> AdapterGenerator:
    """Rebuild a saved generator for ``model``; refuses one made for another backbone."""
    path = Path(path)
    file = path / CONFIG_NAME
    if not file.is_file():
        raise XlpeftValueError(f"{path} is not a generator directory: {CONFIG_NAME} is missing; "
                               "pass the directory save_generator wrote")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        kind, fields = meta["kind"], meta["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CorruptFileError(f"{file} is damaged or not a generator config ({err})") from err
    here = model.backbone_info()
    saved = meta.get("backbone", {})
    diffs = [f"{k}: file {saved.get(k)!r} vs model {here[k]!r}" for k in ("family", "hidden_size", "num_layers")
             if saved.get(k) != here[k]]
    if diffs:
        raise IncompatibleAdapterError(f"generator at {path} was trained for another backbone "
                                       f"({'; '.join(diffs)}); load it into the backbone it was trained with")
    generator = build_generator(kind, model, **fields)
    if generator.slots != meta.get("slots"):
        raise IncompatibleAdapterError(f"generator at {path} has slots {meta.get('slots', [])[:3]} …; this "
                                       f"backbone gives {generator.slots[:3]} …: use the backbone it was trained with")
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except Exception as err:
        raise CorruptFileError(f"{path / WEIGHTS_NAME} is missing or corrupted ({err})") from err
    own = generator.state_dict()
    if set(own) != set(tensors):
        raise CorruptFileError(f"{path / WEIGHTS_NAME} does not match its config "
                               f"(missing {sorted(set(own) - set(tensors))[:3]}); save the generator again")
    generator.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
    return generator

