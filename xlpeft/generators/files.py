"""Generator checkpoints: a directory like an adapter's, checked against the backbone.

    generator_config.json   kind, GeneratorConfig, slots, backbone info
    generator_model.safetensors

Loading refuses a generator made for another backbone (family, width, depth,
slots), naming what differs, before anything is attached.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xlpeft.errors import CorruptFileError, IncompatibleAdapterError, XlpeftTypeError, unknown
from xlpeft.methods.base import short
from xlpeft.ops.artefacts import ArtefactKind
from xlpeft.ops.files import check_compatible, read_config, write_directory
from xlpeft.ops.weights import open_weights

if TYPE_CHECKING:
    from xlpeft.generators.base import AdapterGenerator
    from xlpeft.core.model import AdaptedModel

CONFIG_NAME = "generator_config.json"
WEIGHTS_NAME = "generator_model.safetensors"
GENERATOR = ArtefactKind("generator", CONFIG_NAME, (CONFIG_NAME, WEIGHTS_NAME),
                         lambda m: isinstance(m, dict) and "kind" in m and "config" in m and "slots" in m)


def generator_classes() -> dict[str, tuple[type, type]]:
    """Generator kind → (generator class, config class)."""
    from xlpeft.generators.cpg import CPGConfig, CPGGenerator
    from xlpeft.generators.hyperx import HyperXConfig, HyperXGenerator
    from xlpeft.generators.madg import MadGConfig, MadGGenerator
    return {"madg": (MadGGenerator, MadGConfig), "hyperx": (HyperXGenerator, HyperXConfig),
            "cpg": (CPGGenerator, CPGConfig)}


def make_config(kind: str, **fields: Any) -> Any:
    """The config of a generator ``kind`` from plain values (lists become tuples)."""
    classes = generator_classes()
    if not isinstance(kind, str):
        raise XlpeftTypeError(f"a generator kind can be {', '.join(map(repr, classes))}; got {short(kind)}")
    if kind not in classes:
        raise unknown("generator kind", kind[:80], classes)
    cls = classes[kind][1]
    names = {f.name for f in dataclasses.fields(cls)}
    for key in fields:
        if key not in names:
            raise unknown(f"field of {cls.__name__}", str(key)[:80], names)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def build_generator(kind: str, model: AdaptedModel, **fields: Any) -> AdapterGenerator:
    """A fresh generator of ``kind`` for ``model``'s places."""
    config = make_config(kind, **fields)  # checks the kind first
    return generator_classes()[kind][0].for_model(model, config)


def save_generator(generator: AdapterGenerator, path: str | Path) -> Path:
    """Write the generator's config and weights atomically (never over anything but a generator)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in generator.state_dict().items()}
    meta = {"kind": generator.kind, "config": generator.config.to_dict(), "slots": generator.slots,
            "hidden": generator.hidden, "backbone": generator.backbone}
    return write_directory(path, meta, tensors, CONFIG_NAME, WEIGHTS_NAME, kind=GENERATOR)


def load_generator(path: str | Path, model: AdaptedModel, verify: bool = True) -> AdapterGenerator:
    """Rebuild a saved generator for ``model``; refuses one made for another backbone or damaged.

    Order: config (types, ranges) ─► backbone ─► weights header (dtypes) ─► build
    (sizes checked first) ─► header shapes ─► data (sha256, finite values).
    """
    meta = read_config(Path(path), CONFIG_NAME, "generator")
    path = Path(path)
    kind, fields, slots = meta.get("kind"), meta.get("config"), meta.get("slots")
    if not isinstance(fields, dict) or not isinstance(slots, list) or "backbone" not in meta:
        raise CorruptFileError(f"{path / CONFIG_NAME} is not a generator config: `config` can be an object "
                               f"and `slots` a list; got {short(fields)} and {short(slots)}")
    check_compatible(meta["backbone"], model, path, "generator")
    weights = open_weights(path, WEIGHTS_NAME, "generator")
    generator = build_generator(kind, model, **{str(k): v for k, v in fields.items()})
    if generator.slots != slots:
        raise IncompatibleAdapterError(f"generator at {path} has slots {short(slots[:3])} …; this "
                                       f"backbone gives {generator.slots[:3]} …: use the backbone it was "
                                       "trained with")
    own = generator.state_dict()
    weights.check_shapes({k: tuple(v.shape) for k, v in own.items()}, "generator")
    tensors = weights.load(verify, what="generator")
    generator.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
    return generator
