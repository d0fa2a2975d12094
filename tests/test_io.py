"""Adapter files (``xlpeft/ops/files.py``): round trips, atomic writes, damaged files,
foreign backbones, bad configs, failed loads that leave the model untouched,
and AdapterSoup averaging.

Every adapter is perturbed away from its identity initialisation first, so a
load that silently kept fresh weights would fail the output checks.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import BertConfig, BertForMaskedLM

import xlpeft.ops.files as xio
from xlpeft import AdaptedModel
from xlpeft.errors import CorruptFileError, IncompatibleAdapterError, XlpeftKeyError, XlpeftValueError
from xlpeft.methods import BottleneckConfig, LoRAConfig
from xlpeft.methods.presets import preset
from tiny import FFN, HEADS, HIDDEN, VOCAB, tiny_batch, tiny_model

FAMILIES = ["bert", "xlm-roberta", "t5", "mbart", "m2m_100", "marian", "encoder-decoder"]
PRESETS = ["pfeiffer", "houlsby", "parallel", "lora", "ia3", "bitfit", "madx-language",
           "prefix", "prompt", "compacter", "mam", "unipelt"]
TOL = 1e-6  # measured: save → load round trips are bit-exact (max |Δ| = 0.0)


def _head(family: str) -> str:
    if family in ("bert", "xlm-roberta"):
        return "masked-lm"
    return "base" if family == "encoder-decoder" else "seq2seq"


def _config_or_skip(name: str):
    """The preset, or a skip while its method (or the point kind it needs) is being written."""
    from xlpeft.core.model import _POINTS

    try:
        config = preset(name)
    except ImportError as err:
        pytest.skip(f"preset {name!r} not implemented yet ({err})")
    kinds = {site.kind for part in config.parts for site in part.sites()}
    if not kinds <= set(_POINTS):
        missing = sorted(kinds - set(_POINTS))
        pytest.skip(f"preset {name!r} needs point kinds {missing} not wired into AdaptedModel yet")
    return config


def _model(family: str = "bert") -> AdaptedModel:
    return AdaptedModel(tiny_model(family, _head(family)))


def _perturb(model: AdaptedModel, name: str, seed: int = 0) -> None:
    """Move every parameter of adapter ``name`` off its (identity) init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.adapter_modules(name):
            for p in module.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _adapted(family: str, config, name: str = "a", seed: int = 0) -> AdaptedModel:
    model = _model(family)
    model.add_adapter(name, config)
    _perturb(model, name, seed)
    return model


def _out(model: torch.nn.Module, batch: dict, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch, **kw)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _snapshot(model: AdaptedModel) -> tuple[list[str], dict[str, torch.Tensor]]:
    return list(model.adapter_names), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: AdaptedModel, before: tuple, batch: dict, ref: torch.Tensor) -> None:
    names, state = before
    assert model.adapter_names == names
    now = model.state_dict()
    assert set(now) == set(state)
    assert all(torch.equal(now[k], state[k]) for k in state)
    torch.testing.assert_close(_out(model, batch), ref, rtol=0, atol=0)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("preset_name", PRESETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_same_outputs(family: str, preset_name: str, tmp_path: Path) -> None:
    config = _config_or_skip(preset_name)
    src = _adapted(family, config)
    batch = tiny_batch(src.model)
    expected = _out(src, batch, adapters=["a"] * 4)
    assert not torch.allclose(expected, _out(src, batch)), "perturbed adapter must change outputs"
    src.save_adapter("a", tmp_path / "a")

    fresh = _model(family)
    assert fresh.load_adapter(tmp_path / "a") == "a"
    assert fresh.configs["a"] == src.configs["a"]
    torch.testing.assert_close(_out(fresh, batch, adapters=["a"] * 4), expected, rtol=0, atol=TOL)
    saved, loaded = src.adapter_state_dict("a"), fresh.adapter_state_dict("a")
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_files_are_json_and_safetensors_only(tmp_path: Path) -> None:
    model = _adapted("t5", "madx-language")
    model.save_adapter("a", tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["name"] == "a" and meta["config"]["method"] == "union"
    assert meta["backbone"]["family"] == "t5"
    raw = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert not raw.startswith((b"\x80", b"PK")), "pickle or torch zip archive"
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.adapter_state_dict("a"))
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_load_under_another_name(tmp_path: Path) -> None:
    src = _adapted("bert", "lora")
    src.save_adapter("a", tmp_path / "a")
    fresh = _model()
    assert fresh.load_adapter(tmp_path / "a", name="swh", set_active=True) == "swh"
    batch = tiny_batch(src.model)
    torch.testing.assert_close(_out(fresh, batch), _out(src, batch, adapters=["a"] * 4), rtol=0, atol=TOL)


# --------------------------------------------------------------------------- atomic writes


def _tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("fail_at", ["write", "swap", "interrupt"])
def test_failed_overwrite_keeps_old_directory(fail_at: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import xlpeft.ops.artefacts as artefacts

    model = _adapted("bert", "pfeiffer")
    model.add_adapter("b", "pfeiffer")
    _perturb(model, "b", seed=1)
    target = tmp_path / "out"
    model.save_adapter("a", target)
    old = _tree(target)

    def boom(*args, **kwargs):
        raise (KeyboardInterrupt if fail_at == "interrupt" else OSError)("disk full (simulated)")

    if fail_at == "swap":  # the exchange of the new directory into place fails
        monkeypatch.setattr(artefacts, "_swap_in", boom)
    else:  # writing the weights fails (or Ctrl-C arrives) half-way
        monkeypatch.setattr(xio, "weights_bytes", boom)
    with pytest.raises((OSError, KeyboardInterrupt), match="simulated"):
        model.save_adapter("b", target)
    monkeypatch.undo()
    assert _tree(target) == old
    assert sorted(os.listdir(tmp_path)) == ["out"], "temp or backup directories left behind"


def test_overwrite_replaces_content(tmp_path: Path) -> None:
    model = _adapted("bert", "pfeiffer")
    model.add_adapter("b", "pfeiffer")
    _perturb(model, "b", seed=1)
    model.save_adapter("a", tmp_path / "out")
    model.save_adapter("b", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    fresh = _model()
    assert fresh.load_adapter(tmp_path / "out") == "b"
    batch = tiny_batch(model.model)
    torch.testing.assert_close(_out(fresh, batch, adapters=["b"] * 4), _out(model, batch, adapters=["b"] * 4))


# --------------------------------------------------------------------------- damaged files


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    _adapted("bert", "madx-language").save_adapter("a", tmp_path / "a")
    return tmp_path / "a"


@pytest.fixture
def target() -> tuple[AdaptedModel, dict, torch.Tensor, tuple]:
    """A model that already holds an active adapter ``old``, with its outputs and state."""
    model = _adapted("bert", "lora", name="old", seed=3)
    model.set_active("old")
    batch = tiny_batch(model.model)
    return model, batch, _out(model, batch), _snapshot(model)


@pytest.mark.parametrize("keep", [5, 40, -4], ids=["header", "metadata", "data"])
def test_truncated_weights(saved: Path, target: tuple, keep: int) -> None:
    file = saved / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:keep])
    model, batch, ref, before = target
    with pytest.raises(CorruptFileError, match=re.escape(str(file))):
        model.load_adapter(saved)
    _assert_unchanged(model, before, batch, ref)


def test_corrupted_json(saved: Path, target: tuple) -> None:
    file = saved / "adapter_config.json"
    file.write_text(file.read_text()[:-20])
    model, batch, ref, before = target
    with pytest.raises(CorruptFileError, match=re.escape(str(file)) + ".*not valid JSON"):
        model.load_adapter(saved)
    file.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        model.load_adapter(saved)
    file.write_text("[1, 2]")
    with pytest.raises(CorruptFileError, match="not an xlpeft adapter"):
        model.load_adapter(saved)
    _assert_unchanged(model, before, batch, ref)


def test_missing_files(saved: Path, target: tuple, tmp_path: Path) -> None:
    model, batch, ref, before = target
    with pytest.raises(XlpeftValueError, match="adapter_config.json is missing"):
        model.load_adapter(tmp_path / "nowhere")
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(XlpeftValueError, match="no adapter_model.safetensors"):
        model.load_adapter(saved)
    _assert_unchanged(model, before, batch, ref)


def _edit_config(path: Path, edit) -> None:
    file = path / "adapter_config.json"
    meta = json.loads(file.read_text())
    edit(meta)
    file.write_text(json.dumps(meta))


def test_unknown_method_and_field(saved: Path, target: tuple) -> None:
    model, batch, ref, before = target
    _edit_config(saved, lambda m: m["config"]["configs"][0].update(method="bottlenek"))
    with pytest.raises(XlpeftKeyError, match="unknown adapter method 'bottlenek'.*Did you mean 'bottleneck'"):
        model.load_adapter(saved)
    _edit_config(saved, lambda m: m["config"]["configs"][0].update(method="bottleneck", reduction_factr=2))
    with pytest.raises(XlpeftKeyError, match="unknown field of BottleneckConfig 'reduction_factr'"):
        model.load_adapter(saved)
    _assert_unchanged(model, before, batch, ref)


def test_newer_format_version(saved: Path, target: tuple) -> None:
    model, batch, ref, before = target
    _edit_config(saved, lambda m: m.update(xlpeft_format=99))
    with pytest.raises(IncompatibleAdapterError, match="xlpeft_format.*got 99.*upgrade xlpeft"):
        model.load_adapter(saved)
    _assert_unchanged(model, before, batch, ref)


def test_tensors_not_matching_config(saved: Path, target: tuple) -> None:
    """The adapter is built, then its tensors fail: it must be removed again."""
    model, batch, ref, before = target
    _edit_config(saved, lambda m: m["config"]["configs"][0].update(reduction_factor=4))
    with pytest.raises(XlpeftValueError, match=r"does not fit its config.*shapes \(file vs expected\)"):
        model.load_adapter(saved)
    _assert_unchanged(model, before, batch, ref)


def test_bad_mask_shape_is_rejected(tmp_path: Path, target: tuple) -> None:
    from safetensors.torch import load_file, save_file

    model, batch, ref, before = target
    src = _adapted("bert", "pfeiffer")
    src.save_adapter("a", tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith(".down.weight"))
    tensors[key.replace(".weight", ".weight_mask")] = torch.ones(3, 3, dtype=torch.bool)
    save_file(tensors, str(file))
    with pytest.raises(XlpeftValueError, match=r"weight_mask \(3, 3\) vs"):
        model.load_adapter(tmp_path / "a")
    _assert_unchanged(model, before, batch, ref)


def test_existing_name(saved: Path, target: tuple) -> None:
    model, batch, ref, before = target
    with pytest.raises(XlpeftValueError, match="'old' already exists"):
        model.load_adapter(saved, name="old")
    _assert_unchanged(model, before, batch, ref)


# --------------------------------------------------------------------------- foreign backbones


def _bert(**overrides) -> AdaptedModel:
    config = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                  intermediate_size=FFN, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    return AdaptedModel(BertForMaskedLM(BertConfig(**(config | overrides))).eval())


@pytest.mark.parametrize("overrides, match", [
    ({"hidden_size": 48}, r"hidden_size: file 32 vs model 48"),
    ({"num_hidden_layers": 3}, r"num_layers: file \{'encoder': 2\} vs model \{'encoder': 3\}"),
])
def test_other_backbone(saved: Path, overrides: dict, match: str) -> None:
    model = _bert(**overrides)
    model.add_adapter("old", "lora")
    before = _snapshot(model)
    batch = tiny_batch(model.model)
    ref = _out(model, batch)
    with pytest.raises(IncompatibleAdapterError, match=match + ".*trained with"):
        model.load_adapter(saved)
    _assert_unchanged(model, before, batch, ref)


def test_other_family(saved: Path) -> None:
    model = _model("xlm-roberta")
    with pytest.raises(IncompatibleAdapterError, match="family: file 'bert' vs model 'xlm-roberta'"):
        model.load_adapter(saved)
    assert model.adapter_names == [] and len(model.points) == 0


# --------------------------------------------------------------------------- AdapterSoup


@pytest.mark.parametrize("weights", [None, [0.25, 0.75]])
def test_average_adapters(weights: list[float] | None) -> None:
    model = _model("mbart")
    config = BottleneckConfig(reduction_factor=4, placement=("attn", "ffn"))
    for i, name in enumerate(("x", "y")):
        model.add_adapter(name, config)
        _perturb(model, name, seed=i)
    model.average_adapters("soup", ["x", "y"], weights=weights)
    wx, wy = weights or (0.5, 0.5)
    x, y, soup = (model.adapter_state_dict(n) for n in ("x", "y", "soup"))
    assert soup.keys() == x.keys()
    for key in x:
        torch.testing.assert_close(soup[key], wx * x[key] + wy * y[key], rtol=1e-6, atol=1e-7)
    assert not torch.equal(soup[next(iter(x))], x[next(iter(x))])


def test_average_lora_unites_masks() -> None:
    model = _model("bert")
    for i, name in enumerate(("x", "y")):
        model.add_adapter(name, LoRAConfig(r=2))
        _perturb(model, name, seed=i)
    point = next(p for p in model.points.values() if "x" in p.adapters)
    shape = point.adapters["x"].lora_A.weight.shape
    mask_x = torch.zeros(shape, dtype=torch.bool)
    mask_x[0] = True
    mask_y = torch.zeros(shape, dtype=torch.bool)
    mask_y[:, 0] = True
    point.adapters["x"].lora_A.set_mask(mask_x)
    point.adapters["y"].lora_A.set_mask(mask_y)
    model.average_adapters("soup", ["x", "y"])
    assert torch.equal(point.adapters["soup"].lora_A.weight_mask, mask_x | mask_y)


def test_average_errors_leave_model_unchanged() -> None:
    model = _model("bert")
    model.add_adapter("x", "pfeiffer")
    model.add_adapter("y", "houlsby")
    model.add_adapter("z", "pfeiffer")
    with pytest.raises(XlpeftValueError, match="different configs"):
        model.average_adapters("soup", ["x", "y"])
    with pytest.raises(XlpeftValueError, match="`weights` can be one number per adapter"):
        model.average_adapters("soup", ["x", "z"], weights=[1.0])
    with pytest.raises(XlpeftKeyError, match="unknown adapter 'w'"):
        model.average_adapters("soup", ["x", "w"])
    assert model.adapter_names == ["x", "y", "z"]
    assert not any("soup" in p.adapters for p in model.points.values())
