"""``xlpeft.ops.setups``: saved fusion layers and whole setups, with the adapter files' guarantees."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny import tiny_batch, tiny_model
from xlpeft.core.composition import Average, BatchSplit, Fuse, Stack
from xlpeft.core.model import AdaptedModel
from xlpeft.errors import ArtefactPathError, CorruptFileError, IncompatibleAdapterError, XlpeftValueError
from xlpeft.methods.lora import LoRAConfig
from xlpeft.core.composition import Parallel
from xlpeft.ops.setups import load_fusion, save_fusion, setup_from_json, setup_to_json

SETUP = Stack(Fuse("x", "y"), "z")


def _perturb(modules, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _trained() -> AdaptedModel:
    """x, y (bottleneck) under a trained-looking fusion, then z (LoRA); nothing at its init."""
    model = AdaptedModel(tiny_model("bert"))
    model.add_adapter("x", "pfeiffer").add_adapter("y", "houlsby").add_adapter("z", LoRAConfig(r=2))
    for seed, name in enumerate(("x", "y", "z")):
        _perturb(model.adapter_modules(name), seed)
    model.set_active(SETUP)
    _perturb([p.fusions["x+y"] for p in model.points.values() if "x+y" in getattr(p, "fusions", {})], 9)
    return model


def _out(model: AdaptedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_batch(model.model)).last_hidden_state


def _bare(model: AdaptedModel) -> tuple[list[str], int]:
    return model.adapter_names, len(model.points)


def test_setup_round_trip_restores_identical_outputs(tmp_path: Path) -> None:
    model = _trained()
    expected = _out(model)
    model.save_setup(SETUP, tmp_path / "setup")
    fresh = AdaptedModel(tiny_model("bert"))
    assert not torch.allclose(_out(fresh), expected)
    assert fresh.load_setup(tmp_path / "setup") == SETUP
    assert fresh.active == SETUP and fresh.adapter_names == ["x", "y", "z"]
    assert torch.equal(_out(fresh), expected)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference: frozen
    other = AdaptedModel(tiny_model("bert"))  # a fusion left at its init would differ
    for name in ("x", "y", "z"):
        other.load_adapter(tmp_path / "setup" / "adapters" / name)
    other.set_active(SETUP)
    assert not torch.allclose(_out(other), expected)


def test_setup_json_round_trips_every_block() -> None:
    setup = BatchSplit(Stack("a", Average("b", "c", weights=[0.7, 0.2])), Fuse("a", "b"), "c",
                       batch_sizes=[2, 1, 3])
    data = setup_to_json(setup)
    assert data["block"] == "BatchSplit" and data["children"][1] == {"block": "Fuse", "children": ["a", "b"]}
    back = setup_from_json(data)
    assert back == setup and back.children[0].children[1].weights == setup.children[0].children[1].weights
    with pytest.raises(CorruptFileError, match="not a valid composition"):
        setup_from_json({"block": "Fuse", "children": ["a", {"block": "Stack", "children": ["b"]}]})
    with pytest.raises(CorruptFileError, match="not a valid composition"):
        setup_from_json({"block": "Parallel", "children": ["a"]})  # a Parallel needs two children
    with pytest.raises(CorruptFileError, match="not a valid composition"):
        setup_from_json({"block": "Magic", "children": ["a", "b"]})
    parallel = Stack("lang", Parallel("ner", Stack("pos", "x")))
    assert setup_from_json(setup_to_json(parallel)) == parallel


def test_fusion_round_trip_over_separately_loaded_adapters(tmp_path: Path) -> None:
    model = _trained()
    fuse = Fuse("x", "y")
    model.set_active(fuse)
    expected = _out(model)
    save_fusion(model, fuse, tmp_path / "fusion")
    for name in ("x", "y"):
        model.save_adapter(name, tmp_path / name)
    fresh = AdaptedModel(tiny_model("bert"))
    for name in ("x", "y"):
        fresh.load_adapter(tmp_path / name)
    assert load_fusion(fresh, tmp_path / "fusion") == fuse
    fresh.set_active(fuse)
    assert torch.equal(_out(fresh), expected)


def test_save_fusion_without_layers_is_refused(tmp_path: Path) -> None:
    model = AdaptedModel(tiny_model("bert"))
    model.add_adapter("x", "pfeiffer").add_adapter("y", "pfeiffer")
    with pytest.raises(XlpeftValueError, match="has no fusion layer"):
        save_fusion(model, Fuse("x", "y"), tmp_path / "fusion")
    assert not (tmp_path / "fusion").exists()


def test_damaged_files_are_refused_and_leave_the_model_unchanged(tmp_path: Path) -> None:
    _trained().save_setup(SETUP, tmp_path / "setup")
    fresh = AdaptedModel(tiny_model("bert"))
    weights = tmp_path / "setup" / "fusions" / "x+y" / "fusion_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CorruptFileError, match="sha256 recorded in setup_config.json"):
        fresh.load_setup(tmp_path / "setup")
    assert _bare(fresh) == ([], 0) and fresh.active is None
    with_adapters = _with_adapters(tmp_path / "setup")
    with pytest.raises(CorruptFileError, match="fusion_model.safetensors does not match its sha256"):
        load_fusion(with_adapters, weights.parent)  # the fusion directory's own header checks it too
    assert not any(len(getattr(p, "fusions", {})) for p in with_adapters.points.values())
    config = tmp_path / "setup" / "setup_config.json"
    config.write_text(config.read_text().replace('"z"', '"w"'))
    with pytest.raises(CorruptFileError, match="setup_config.json does not match"):
        fresh.load_setup(tmp_path / "setup")
    assert _bare(fresh) == ([], 0)


def _with_adapters(setup: Path) -> AdaptedModel:
    model = AdaptedModel(tiny_model("bert"))
    for name in ("x", "y"):
        model.load_adapter(setup / "adapters" / name)
    return model


def test_a_late_failure_removes_everything_the_load_added(tmp_path: Path) -> None:
    _trained().save_setup(SETUP, tmp_path / "setup")
    fresh = AdaptedModel(tiny_model("bert"))
    fresh.add_adapter("keep", "pfeiffer")
    (tmp_path / "setup" / "fusions" / "x+y" / "fusion_config.json").write_text('{"xlpeft_fusion": 99}')
    with pytest.raises(IncompatibleAdapterError, match="`xlpeft_fusion` can be 1"):
        fresh.load_setup(tmp_path / "setup", verify=False)  # x, y and z were loaded, then refused
    assert fresh.adapter_names == ["keep"] and fresh.active is None
    assert all(list(p.adapters) == ["keep"] and not len(getattr(p, "fusions", {})) for p in fresh.points.values())


def test_names_in_use_and_other_backbones_are_refused(tmp_path: Path) -> None:
    _trained().save_setup(SETUP, tmp_path / "setup")
    taken = AdaptedModel(tiny_model("bert")).add_adapter("y", "pfeiffer")
    with pytest.raises(XlpeftValueError, match=r"already has adapters \['y'\]"):
        taken.load_setup(tmp_path / "setup")
    assert taken.adapter_names == ["y"]
    other = AdaptedModel(tiny_model("xlm-roberta"))
    with pytest.raises(IncompatibleAdapterError, match="family: file 'bert' vs model 'xlm-roberta'"):
        other.load_setup(tmp_path / "setup")
    assert _bare(other) == ([], 0)


def test_foreign_destinations_are_refused_and_own_saves_replaced(tmp_path: Path) -> None:
    model = _trained()
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(ArtefactPathError, match="xlpeft replaces only a setup directory it wrote"):
        model.save_setup(SETUP, project)
    assert (project / "notes.txt").read_text() == "mine" and sorted(p.name for p in project.iterdir()) == ["notes.txt"]
    model.save_setup(SETUP, tmp_path / "setup")
    model.save_setup(Stack("x", "z"), tmp_path / "setup")  # its own save: replaced atomically
    assert sorted(p.name for p in (tmp_path / "setup" / "adapters").iterdir()) == ["x", "z"]
    assert not (tmp_path / "setup" / "fusions").exists()
    with pytest.raises(ArtefactPathError, match="no xlpeft fusion"):
        save_fusion(model, Fuse("x", "y"), tmp_path / "setup")


def test_average_and_batch_split_setups_round_trip(tmp_path: Path) -> None:
    model = _trained()
    setup = BatchSplit(Average("x", "y", weights=[0.7, 0.2]), Stack("y", "z"), batch_sizes=[2, 2])
    model.set_active(setup)
    expected = _out(model)
    model.save_setup(setup, tmp_path / "setup")
    fresh = AdaptedModel(tiny_model("bert"))
    assert fresh.load_setup(tmp_path / "setup", set_active=False) == setup and fresh.active is None
    assert not (tmp_path / "setup" / "fusions").exists()
    fresh.set_active(setup)
    assert torch.equal(_out(fresh), expected)
