"""bert2bert warm start from an encoder folder (the embedded default translation backbone)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from lightning_tiny import save_tiny_backbone
from tiny import tiny_model
from xlpeft.backbones.warmstart import is_encoder_only, warm_start_bert2bert
from xlpeft.errors import XlpeftValueError


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_backbone(tmp_path_factory.mktemp("ws") / "bert")


def test_both_sides_copy_the_encoder_and_cross_attention_is_new(bert: Path) -> None:
    model, tok = warm_start_bert2bert(bert)
    enc, dec = model.encoder.state_dict(), model.decoder.bert.state_dict()
    for key, value in enc.items():
        if key in dec:
            torch.testing.assert_close(dec[key], value, msg=key)
    assert any("crossattention" in k for k in dec) and not any("crossattention" in k for k in enc)
    assert model.decoder.cls.predictions.decoder.weight is model.decoder.bert.embeddings.word_embeddings.weight
    assert model.config.decoder_start_token_id == tok.cls_token_id
    assert model.config.eos_token_id == tok.sep_token_id and model.config.pad_token_id == tok.pad_token_id
    assert model.decoder.config.is_decoder and model.decoder.config.add_cross_attention


def test_warm_start_is_seeded_saves_and_reloads(bert: Path, tmp_path: Path) -> None:
    a, tok = warm_start_bert2bert(bert)
    b, _ = warm_start_bert2bert(bert)
    enc = tok(["the lord", "of all"], return_tensors="pt", padding=True)
    labels = tok(["and he", "unto them"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        logits = a(**enc, labels=labels).logits
        torch.testing.assert_close(b(**enc, labels=labels).logits, logits)
    a.save_pretrained(tmp_path / "b2b")
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "b2b").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**enc, labels=labels).logits, logits)


def test_layer_counts_can_be_cut(bert: Path) -> None:
    model, _ = warm_start_bert2bert(bert, decoder_layers=1, encoder_layers=1)
    assert len(model.encoder.encoder.layer) == 1 and len(model.decoder.bert.encoder.layer) == 1
    assert len(warm_start_bert2bert(bert, decoder_layers=5)[0].decoder.bert.encoder.layer) == 2  # at most 5
    with pytest.raises(XlpeftValueError, match=r"`decoder_layers` can be a positive int .* or None; got 0"):
        warm_start_bert2bert(bert, decoder_layers=0)


def test_a_seq2seq_folder_is_refused(tmp_path: Path, bert: Path) -> None:
    tiny_model("mt5", "seq2seq").save_pretrained(tmp_path / "mt5")
    assert is_encoder_only(bert) and not is_encoder_only(tmp_path / "mt5")
    with pytest.raises(XlpeftValueError, match="needs an encoder-only model folder.*Load it directly with head='seq2seq'"):
        warm_start_bert2bert(tmp_path / "mt5")
