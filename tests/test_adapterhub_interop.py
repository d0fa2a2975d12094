"""AdapterHub ``adapters`` interop: golden outputs from the real library, and round trips.

The fixtures (tiny BERT and XLM-R, adapter directories as AdapterHub 1.3 wrote them,
its outputs for fixed inputs) come from ``scripts/make_adapterhub_fixtures.py``,
run in AdapterHub's own virtual environment; that script also checked that
AdapterHub loads what ``save_adapter(format="adapters")`` writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from xlpeft import AdaptedModel, Stack
from xlpeft.errors import CorruptFileError, IncompatibleAdapterError, XlpeftValueError

ROOT = Path(__file__).parent / "fixtures" / "adapterhub"
FAMILIES = ("bert", "xlm-roberta")
CASES = ("seqbn", "seqbn_inv", "double_seqbn", "bn_post", "par_bn", "lora", "prefix", "prefix_flat", "compacter")
OUTPUTS = load_file(str(ROOT / "outputs.safetensors"))
BATCH = {k: OUTPUTS[k] for k in ("input_ids", "attention_mask")}


def model_of(family: str, head: str = "base") -> AdaptedModel:
    return AdaptedModel.from_pretrained(str(ROOT / family / "model"), head=head)


def hidden(model: AdaptedModel) -> torch.Tensor:
    with torch.no_grad():
        out = model(**BATCH, output_hidden_states=True)
    return out.hidden_states[-1]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.mark.parametrize("case", CASES)
def test_outputs_equal_adapterhub(family: str, case: str) -> None:
    model = model_of(family)
    assert (hidden(model) - OUTPUTS[f"{family}/base"]).abs().max() < 1e-5  # the backbone itself
    name = model.load_adapter(str(ROOT / family / case), set_active=True)
    assert name == f"{case}_a"
    peer = OUTPUTS[f"{family}/{case}"]
    assert (peer - OUTPUTS[f"{family}/base"]).abs().max() > 1e-2  # the adapter changes the output (≫ 1e-5)
    torch.testing.assert_close(hidden(model), peer, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_save_as_adapterhub_round_trip(family: str, case: str, tmp_path: Path) -> None:
    model = model_of(family)
    name = model.load_adapter(str(ROOT / family / case), set_active=True)
    out = tmp_path / case
    model.save_adapter(name, str(out), format="adapters")
    ours, peer = (json.loads((d / "adapter_config.json").read_text()) for d in (out, ROOT / family / case))
    assert ours["config"] == peer["config"]  # every field AdapterHub writes, with its values
    assert {k: ours[k] for k in ("model_type", "hidden_size", "name")} == \
        {k: peer[k] for k in ("model_type", "hidden_size", "name")}
    peer_file = ROOT / family / case / "adapter.safetensors"
    theirs = load_file(str(peer_file)) if peer_file.is_file() else \
        torch.load(ROOT / family / case / "pytorch_adapter.bin", weights_only=True)
    mine = load_file(str(out / "adapter.safetensors"))  # same keys, shapes and values as AdapterHub's own file
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in theirs)
    again = model_of(family)
    again.load_adapter(str(out), set_active=True)
    torch.testing.assert_close(hidden(again), OUTPUTS[f"{family}/{case}"], atol=1e-5, rtol=0)


def _stack(family: str, setup: str) -> torch.Tensor:
    model = model_of(family)
    model.set_active(Stack(*(model.load_adapter(str(ROOT / family / f"{setup}_{part}")) for part in ("lang", "task"))))
    return hidden(model)


def test_madx_stack_of_default_placement_adapters_equals_adapterhub(family: str) -> None:
    """Stack(lang, task) of BnConfig(original_ln_before=False) adapters, the language one with NICE."""
    torch.testing.assert_close(_stack(family, "stack_bn"), OUTPUTS[f"{family}/stack_bn"], atol=1e-5, rtol=0)


def test_madx_stack_of_seqbn_adapters_equals_adapterhub(family: str) -> None:
    torch.testing.assert_close(_stack(family, "stack"), OUTPUTS[f"{family}/stack"], atol=1e-5, rtol=0)


def test_shared_phm_rule_compacter_is_refused(family: str) -> None:
    model = model_of(family)
    with pytest.raises(XlpeftValueError, match="shared PHM rule .* AdapterHub 1.x does not save"):
        model.load_adapter(str(ROOT / family / "compacter_shared"))
    assert model.adapter_names == []
    model.add_adapter("c", "compacter")
    with pytest.raises(XlpeftValueError, match="shared_phm_rule=False"):
        model.save_adapter("c", str(ROOT / "never-written"), format="adapters")
    assert not (ROOT / "never-written").exists()


@pytest.mark.parametrize("preset", ["madx-language-seqbn", "houlsby", "parallel", "lora", "madx-language", "prefix",
                                    {"method": "compacter", "reduction_factor": 2, "shared_phm_rule": False},
                                    {"method": "prefix", "prefix_length": 3, "reparametrize": False}],
                         ids=lambda p: p if isinstance(p, str) else p["method"] + "-variant")
def test_xlpeft_adapter_round_trips_through_adapterhub_format(preset: str, tmp_path: Path) -> None:
    model = model_of("bert")
    model.add_adapter("mine", preset, set_active=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.adapter_modules("mine"):
            for p in module.parameters():
                p.normal_(0, 0.2)  # non-identity
    expected = hidden(model)
    model.save_adapter("mine", str(tmp_path / "a"), format="adapters")
    other = model_of("bert")
    assert other.load_adapter(str(tmp_path / "a"), set_active=True) == "mine"
    torch.testing.assert_close(hidden(other), expected, atol=1e-6, rtol=0)


def test_head_model_and_prefixed_keys(tmp_path: Path) -> None:
    """A head model loads a bare model's file, and a head model's file (``bert.`` prefix) too."""
    masked = model_of("bert", head="masked-lm")
    masked.load_adapter(str(ROOT / "bert" / "seqbn_inv"), set_active=True)
    torch.testing.assert_close(hidden(masked), OUTPUTS["bert/seqbn_inv"], atol=1e-5, rtol=0)
    src = ROOT / "bert" / "seqbn"
    shutil.copy(src / "adapter_config.json", tmp_path / "adapter_config.json")
    save_file({f"bert.{k}": v for k, v in load_file(str(src / "adapter.safetensors")).items()},
              str(tmp_path / "adapter.safetensors"))
    masked.load_adapter(str(tmp_path), name="prefixed", set_active=True)
    torch.testing.assert_close(hidden(masked), OUTPUTS["bert/seqbn"], atol=1e-5, rtol=0)


def _copy(case: str, tmp_path: Path, family: str = "bert") -> Path:
    out = tmp_path / case
    shutil.copytree(ROOT / family / case, out)
    return out


def _edit(path: Path, **fields) -> None:
    meta = json.loads((path / "adapter_config.json").read_text())
    for key, value in fields.items():
        if key in meta:
            meta[key] = value
        else:
            meta["config"][key] = value
    (path / "adapter_config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(("fields", "error", "match"), [
    ({"ln_before": True}, XlpeftValueError, "ln_before=True"),
    ({"use_gating": True}, XlpeftValueError, "gating"),
    ({"phm_layer": True}, XlpeftValueError, "Compacter"),
    ({"scaling": "learned"}, XlpeftValueError, "learned scaling"),
    ({"inv_adapter": "glow"}, XlpeftValueError, "GLOW"),
    ({"reduction_factor": {"default": 4, "1": 2}}, XlpeftValueError, "Per-layer"),
    ({"architecture": "prompt_tuning"}, XlpeftValueError, "Prompt tuning"),
    ({"non_linearity": "gelu_new"}, XlpeftValueError, "non_linearity"),
    ({"model_type": "t5"}, IncompatibleAdapterError, "model_type"),
    ({"hidden_size": 64}, IncompatibleAdapterError, "hidden_size"),
    ({"reduction_factor": 8}, IncompatibleAdapterError, "does not fit"),
])
def test_unsupported_or_mismatched_files_are_refused(fields, error, match, tmp_path: Path) -> None:
    path = _copy("seqbn_inv", tmp_path)
    _edit(path, **fields)
    model = model_of("bert")
    with pytest.raises(error, match=match):
        model.load_adapter(str(path))
    assert model.adapter_names == [] and len(model.points) == 0  # nothing half-loaded


def test_lora_feature_refused(tmp_path: Path) -> None:
    path = _copy("lora", tmp_path)
    _edit(path, composition_mode="scale")
    with pytest.raises(XlpeftValueError, match="IA"):
        model_of("bert").load_adapter(str(path))


def test_pickled_code_and_unknown_keys_are_refused(tmp_path: Path) -> None:
    path = _copy("par_bn", tmp_path)
    torch.save({"x": torch.nn.Linear(2, 2)}, path / "pytorch_adapter.bin")  # not plain tensors
    with pytest.raises(CorruptFileError, match="weights_only"):
        model_of("bert").load_adapter(str(path))
    state = torch.load(ROOT / "bert" / "par_bn" / "pytorch_adapter.bin", weights_only=True)
    state["encoder.layer.0.output.adapters.par_bn_a.adapter_norm_before.weight"] = torch.ones(32)
    torch.save(state, path / "pytorch_adapter.bin")
    with pytest.raises(IncompatibleAdapterError, match="adapter_norm_before"):
        model_of("bert").load_adapter(str(path))


def test_save_refuses_what_adapterhub_cannot_hold(tmp_path: Path) -> None:
    model = model_of("bert")
    model.add_adapter("scale", "ia3")
    with pytest.raises(XlpeftValueError, match="format='xlpeft'"):
        model.save_adapter("scale", str(tmp_path / "x"), format="adapters")
    model.add_adapter("o_lora", {"method": "lora", "r": 2, "targets": ["o"]})
    with pytest.raises(XlpeftValueError, match="roles"):
        model.save_adapter("o_lora", str(tmp_path / "y"), format="adapters")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(XlpeftValueError, match="'adapters'"):
        model.save_adapter("scale", str(tmp_path / "z"), format="adapterhub")


def test_a_saved_prediction_head_is_named_not_loaded(tmp_path: Path) -> None:
    from xlpeft.errors import XlpeftWarning

    path = _copy("seqbn", tmp_path)
    (path / "head_config.json").write_text("{}")
    with pytest.warns(XlpeftWarning, match="prediction head"):
        model_of("bert").load_adapter(str(path))


def test_files_without_a_version_read_gelu_as_adapter_transformers_did(tmp_path: Path) -> None:
    """Older adapter-transformers wrote ``gelu`` for the tanh GELU and ``gelu_orig`` for the exact one."""
    path = _copy("bn_post", tmp_path)  # trained with the exact GELU
    meta = json.loads((path / "adapter_config.json").read_text())
    del meta["version"]
    (path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(XlpeftValueError, match="non_linearity.*gelu_new"):
        model_of("bert").load_adapter(str(path))
    _edit(path, non_linearity="gelu_orig")
    model = model_of("bert")
    model.load_adapter(str(path), set_active=True)
    torch.testing.assert_close(hidden(model), OUTPUTS["bert/bn_post"], atol=1e-5, rtol=0)
