"""load_backbone on local folders saved from tiny random models (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertForMaskedLM, EncoderDecoderModel, MarianMTModel, XLMRobertaForTokenClassification

from tiny import tiny_batch, tiny_model, tiny_tokenizer
from xlpeft.backbones.loading import HEADS, load_backbone
from xlpeft.errors import XlpeftKeyError, XlpeftValueError


def _save(tmp_path: Path, family: str, head: str = "base", with_tokenizer: bool = True) -> Path:
    folder = tmp_path / family
    tiny_model(family, head).save_pretrained(folder)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def test_load_by_path_same_weights_and_tokenizer(tmp_path: Path) -> None:
    folder = _save(tmp_path, "bert", "masked-lm")
    model, tok = load_backbone(folder, head="masked-lm")
    assert isinstance(model, BertForMaskedLM) and not model.training
    assert tok is not None and tok("hello worlds")["input_ids"] == [2, 5, 6, 11, 3]
    ref = tiny_model("bert", "masked-lm")
    batch = tiny_batch(ref)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, ref(**batch).logits, atol=1e-6)
    model2, _ = load_backbone(str(folder), head="masked-lm", tokenizer=False)  # str paths too
    assert isinstance(model2, BertForMaskedLM)


def test_kwargs_reach_config_and_model(tmp_path: Path) -> None:
    folder = _save(tmp_path, "xlm-roberta", with_tokenizer=False)
    model, tok = load_backbone(folder, head="token-cls", num_labels=5, attn_implementation="eager")
    assert isinstance(model, XLMRobertaForTokenClassification)
    assert model.classifier.out_features == 5 and model.config._attn_implementation == "eager"
    assert tok is None, "a folder without tokenizer files gives no tokenizer (not an empty default one)"


@pytest.mark.parametrize(("family", "head", "cls"), [
    ("marian", "seq2seq", MarianMTModel),
    ("encoder-decoder", "base", EncoderDecoderModel),  # no bare class: falls back to the seq2seq one
])
def test_seq2seq_heads(tmp_path: Path, family: str, head: str, cls: type) -> None:
    model, _ = load_backbone(_save(tmp_path, family, "seq2seq", with_tokenizer=False), head=head)
    assert isinstance(model, cls)


def test_unknown_head_lists_heads(tmp_path: Path) -> None:
    with pytest.raises(XlpeftKeyError, match=r"unknown head 'mlm'.*masked-lm.*seq2seq"):
        load_backbone(tmp_path, head="mlm")
    assert set(HEADS) == {"base", "masked-lm", "seq-cls", "token-cls", "seq2seq", "causal-lm"}


def test_head_not_available_for_model_type(tmp_path: Path) -> None:
    folder = _save(tmp_path, "bert", with_tokenizer=False)
    with pytest.raises(XlpeftValueError, match=r"head 'seq2seq' is not available for model_type 'bert'.*'masked-lm'"):
        load_backbone(folder, head="seq2seq")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(XlpeftValueError, match=r"no folder at .*local Hugging Face model folder.*hub model name"):
        load_backbone(tmp_path / "nope")
    with pytest.raises(XlpeftValueError, match="no folder at"):
        load_backbone("./definitely/not/here")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(XlpeftValueError, match="not a model folder .no config.json"):
        load_backbone(tmp_path / "empty")


def test_hub_name_offline_is_a_clear_error() -> None:
    with pytest.raises(XlpeftValueError, match=r"cannot load the config of 'someorg/no-such-model'.*Cause:") as info:
        load_backbone("someorg/no-such-model", local_files_only=True)
    assert isinstance(info.value.__cause__, OSError)
