"""HF PEFT interop for LoRA: xlpeft → PEFT and PEFT → xlpeft give the same outputs.

Both directions use non-zero ``lora_B`` (PEFT: ``init_lora_weights=False``;
xlpeft: perturbed), and each test first checks the adapter changes the
backbone's outputs, so a silently skipped load cannot pass.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from xlpeft import AdaptedModel
from xlpeft.errors import IncompatibleAdapterError, XlpeftValueError
from xlpeft.methods import LoRAConfig
from tiny import FFN, HEADS, VOCAB, tiny_batch, tiny_config, tiny_model

peft = pytest.importorskip("peft")

ALL_ROLES = ("q", "k", "v", "o", "ffn_up", "ffn_down", "cross_q", "cross_k", "cross_v", "cross_o")
CASES = [("bert", "masked-lm"), ("t5", "seq2seq"), ("mbart", "seq2seq")]
QV = {"bert": ["query", "value"], "t5": ["q", "v"], "mbart": ["q_proj", "v_proj"]}
# Measured max |Δ| on these tiny models: 0.0 (same ops in the same order);
# after merging into the backbone weights: ≤ 3e-6 (t5 logits of magnitude ~5).
TOL, MERGED_TOL = 1e-6, 1e-5


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _xlpeft_lora(family: str, head: str, targets: tuple[str, ...]) -> AdaptedModel:
    model = AdaptedModel(tiny_model(family, head))
    model.add_adapter("a", LoRAConfig(r=4, alpha=8, targets=targets), set_active=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.adapter_modules("a"):
            for p in module.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def _peft_dir(family: str, head: str, target_modules, path: Path, **lora_kw) -> tuple[torch.Tensor, dict]:
    """Train-free PEFT LoRA (random A and B) saved at ``path``; returns its logits and the batch."""
    base = tiny_model(family, head)
    batch = tiny_batch(base)
    bare = _logits(base, batch)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False,
                             **lora_kw)
    model = peft.get_peft_model(base, config).eval()
    logits = _logits(model, batch)
    assert not torch.allclose(logits, bare), "the PEFT adapter must change the outputs"
    model.save_pretrained(str(path))
    return logits, batch


# --------------------------------------------------------------------------- xlpeft → PEFT


@pytest.mark.parametrize("targets", [("q", "v"), ALL_ROLES], ids=["qv", "all"])
@pytest.mark.parametrize("family, head", CASES)
def test_xlpeft_to_peft(family: str, head: str, targets: tuple[str, ...], tmp_path: Path) -> None:
    model = _xlpeft_lora(family, head, targets)
    batch = tiny_batch(model.model)
    expected = _logits(model, batch)
    with model.disable_adapters():
        assert not torch.allclose(expected, _logits(model, batch))
    model.save_adapter("a", tmp_path / "a", format="peft")

    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (meta["peft_type"], meta["r"], meta["lora_alpha"], meta["bias"]) == ("LORA", 4, 8, "none")

    loaded = peft.PeftModel.from_pretrained(tiny_model(family, head), str(tmp_path / "a")).eval()
    n_lora = sum(1 for n, _ in loaded.named_modules() if n.endswith("lora_A.default"))
    assert n_lora == len([p for p in model.points.values() if "a" in p.adapters])
    torch.testing.assert_close(_logits(loaded, batch), expected, rtol=0, atol=TOL)

    back = AdaptedModel(tiny_model(family, head))  # and the PEFT files read back into xlpeft
    back.load_adapter(tmp_path / "a", name="b", set_active=True)
    torch.testing.assert_close(_logits(back, batch), expected, rtol=0, atol=TOL)


def test_only_ungated_lora_is_convertible(tmp_path: Path) -> None:
    model = AdaptedModel(tiny_model("bert"))
    model.add_adapter("bottle", "pfeiffer")
    model.add_adapter("gated", LoRAConfig(gated=True))
    with pytest.raises(XlpeftValueError, match="ungated 'lora'.*got 'bottleneck'.*format='xlpeft'"):
        model.save_adapter("bottle", tmp_path / "x", format="peft")
    with pytest.raises(XlpeftValueError, match="got 'gated lora'"):
        model.save_adapter("gated", tmp_path / "x", format="peft")
    with pytest.raises(XlpeftValueError, match="`format` can be 'xlpeft', 'peft'; got 'hf'"):
        model.save_adapter("gated", tmp_path / "x", format="hf")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- PEFT → xlpeft


@pytest.mark.parametrize("targets", ["qv", "all-linear"])
@pytest.mark.parametrize("family, head", CASES)
def test_peft_to_xlpeft(family: str, head: str, targets: str, tmp_path: Path) -> None:
    target_modules = QV[family] if targets == "qv" else targets
    expected, batch = _peft_dir(family, head, target_modules, tmp_path / "p")
    model = AdaptedModel(tiny_model(family, head))
    name = model.load_adapter(tmp_path / "p", set_active=True)
    assert name == "p"
    config = model.configs[name]
    assert isinstance(config, LoRAConfig) and (config.r, config.alpha) == (4, 8)
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=TOL)

    model.merge(name)  # folded into the backbone weights, still PEFT's outputs
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=MERGED_TOL)
    model.unmerge(name)
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=MERGED_TOL)


def test_rslora_and_layer_subsets(tmp_path: Path) -> None:
    """``use_rslora`` becomes α·√r; ``layers_to_transform`` shows up as exact module names."""
    expected, batch = _peft_dir("bert", "masked-lm", ["query", "dense"], tmp_path / "p",
                                use_rslora=True, layers_to_transform=[1])
    model = AdaptedModel(tiny_model("bert", "masked-lm"))
    model.load_adapter(tmp_path / "p", name="rs", set_active=True)
    assert model.configs["rs"].alpha == pytest.approx(8 * 2)
    patterns = model.configs["rs"].target_patterns
    assert len(patterns) == 4 and all(r"layer\.1\." in p for p in patterns), patterns
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=TOL)


def test_peft_on_bare_base_model_loads_into_head_model(tmp_path: Path) -> None:
    """PEFT keys of a bare ``BertModel`` (``encoder.…``) find ``bert.encoder.…`` in a head model."""
    head = tiny_model("bert", "masked-lm")
    base = BertModel(tiny_config("bert"), add_pooling_layer=False).eval()
    base.load_state_dict(head.bert.state_dict())
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "p"))
    batch = tiny_batch(head)
    with torch.no_grad():
        expected = pm(**batch).last_hidden_state
        assert not torch.allclose(head.bert(**batch).last_hidden_state, expected)
    model = AdaptedModel(head)
    model.load_adapter(tmp_path / "p", set_active=True)
    assert all(p.startswith(re.escape("bert.")) for p in model.configs["p"].target_patterns)
    with torch.no_grad():
        hidden = head.bert(**batch).last_hidden_state
    torch.testing.assert_close(hidden, expected, rtol=0, atol=TOL)


# --------------------------------------------------------------------------- refusals


def _edit(path: Path, **changes) -> None:
    file = path / "adapter_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | changes))


@pytest.fixture
def peft_dir(tmp_path: Path) -> Path:
    _peft_dir("bert", "masked-lm", ["query", "value"], tmp_path / "p")
    return tmp_path / "p"


@pytest.fixture
def holder() -> tuple[AdaptedModel, dict, torch.Tensor, list[str]]:
    model = AdaptedModel(tiny_model("bert", "masked-lm"))
    model.add_adapter("old", "lora", set_active=True)
    batch = tiny_batch(model.model)
    return model, batch, _logits(model, batch), sorted(model.state_dict())


def _unchanged(holder: tuple) -> None:
    model, batch, ref, keys = holder
    assert model.adapter_names == ["old"] and sorted(model.state_dict()) == keys
    torch.testing.assert_close(_logits(model, batch), ref, rtol=0, atol=0)


@pytest.mark.parametrize("changes, match", [
    ({"use_dora": True}, r"use_dora=True \(DoRA"),
    ({"rank_pattern": {"query": 2}}, r"rank_pattern=\{'query': 2\} \(per-module ranks\)"),
    ({"modules_to_save": ["classifier"], "bias": "all"}, r"modules_to_save=.*; bias='all'"),
    ({"fan_in_fan_out": True}, r"fan_in_fan_out=True"),
    ({"peft_type": "IA3"}, r"`peft_type` can be 'LORA'.*got 'IA3'"),
])
def test_unsupported_features_are_refused(peft_dir: Path, holder: tuple, changes: dict, match: str) -> None:
    _edit(peft_dir, **changes)
    with pytest.raises(XlpeftValueError, match=match):
        holder[0].load_adapter(peft_dir)
    _unchanged(holder)


def test_dora_magnitude_key_is_refused(tmp_path: Path, holder: tuple) -> None:
    from safetensors.torch import load_file, save_file

    _peft_dir("bert", "masked-lm", ["query"], tmp_path / "p")
    file = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_magnitude_vector"
    tensors[key] = torch.ones(32)
    save_file(tensors, str(file))
    with pytest.raises(XlpeftValueError, match="lora_magnitude_vector.*lora_A.weight"):
        holder[0].load_adapter(tmp_path / "p")
    _unchanged(holder)


def test_other_backbone_and_existing_name(peft_dir: Path, holder: tuple) -> None:
    with pytest.raises(XlpeftValueError, match="'old' already exists"):
        holder[0].load_adapter(peft_dir, name="old")
    _unchanged(holder)
    torch.manual_seed(0)
    wide = AdaptedModel(BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=64)).eval())
    match = r"does not fit.*lora_A \(4, 32\).*expected \(4, 48\)"
    with pytest.raises(IncompatibleAdapterError, match=match):
        wide.load_adapter(peft_dir)
    assert wide.adapter_names == [] and len(wide.points) == 0
    t5 = AdaptedModel(tiny_model("t5"))
    with pytest.raises(IncompatibleAdapterError, match="attention.self.query: no such module"):
        t5.load_adapter(peft_dir)
