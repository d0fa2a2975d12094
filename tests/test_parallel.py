"""Parallel data: readers, embedded corpora as pairs, encoding, collation, the DataModule."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lightning_tiny import save_tiny_backbone
from tiny import tiny_tokenizer
from xlpeft.data.parallel import (
    Pair,
    Seq2SeqCollator,
    Seq2SeqFormat,
    corpus_pairs,
    encode_pairs,
    parse_direction,
    read_aligned,
    read_pairs,
)
from xlpeft.data.parallel_datamodule import ParallelDataModule, add_noise
from xlpeft.errors import CorruptFileError, XlpeftValueError


def test_misaligned_files_name_each_file_and_count(tmp_path: Path) -> None:
    (tmp_path / "a.es").write_text("uno\ndos\ntres\n")
    (tmp_path / "a.nah").write_text("ce\nome\n")
    with pytest.raises(CorruptFileError, match=r"a\.es has 3 lines but .*a\.nah has 2\. Re-align"):
        read_aligned(tmp_path / "a.es", tmp_path / "a.nah", "spa", "nah")


def test_readers_drop_empty_sides_with_a_logged_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "p.tsv").write_text("uno\tce\n\ndos\t\nspa\tote\ttres\tyeto\n")
    with caplog.at_level(logging.WARNING):
        pairs = read_pairs(str(tmp_path / "p.tsv"), "spa", "nah")
    assert pairs == [Pair("uno", "ce", "spa", "nah"), Pair("tres", "yeto", "spa", "ote")]
    assert "dropped 2 of 4 pairs with an empty side" in caplog.text
    rows = [{"src": "uno", "tgt": "ce"}, {"src": "dos", "tgt": "ome", "tgt_lang": "ote"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert read_pairs(str(tmp_path / "p.jsonl"), "spa", "nah")[1] == Pair("dos", "ome", "spa", "ote")
    (tmp_path / "bad.tsv").write_text("a\tb\tc\n")
    with pytest.raises(CorruptFileError, match=r"bad\.tsv:1: a TSV line can have 2 columns .* got 3"):
        read_pairs(str(tmp_path / "bad.tsv"), "spa", "nah")


def test_a_local_datasets_folder_with_translation_columns(tmp_path: Path) -> None:
    from datasets import Dataset
    Dataset.from_dict({"translation": [{"es": "uno", "en": "one"}, {"es": "dos", "en": "two"}]}).save_to_disk(
        str(tmp_path / "ds"))
    assert read_pairs(str(tmp_path / "ds"), "es", "en") == [Pair("uno", "one", "es", "en"), Pair("dos", "two", "es", "en")]


def test_directions_are_checked() -> None:
    assert parse_direction("spa-nah") == ("spa", "nah")
    with pytest.raises(XlpeftValueError, match="a direction can be written 'src-tgt' such as 'spa-nah'; got 'spa'"):
        parse_direction("spa")


def test_embedded_corpora_give_aligned_pairs_split_alike() -> None:
    es_nah = corpus_pairs("spa", "nah", "test")
    assert es_nah and all(p.src_lang == "spa" and p.tgt_lang == "nah" for p in es_nah)
    nah_es = corpus_pairs("nah", "spa", "test")
    assert [(p.tgt, p.src) for p in nah_es] == [(p.src, p.tgt) for p in es_nah]
    train = set(corpus_pairs("spa", "nah", "train"))
    assert not train & set(es_nah) and len(es_nah) < len(train) / 10
    kas = corpus_pairs("kas", "eng", "validation")
    assert kas and kas[0].tgt_lang == "eng"
    bible = corpus_pairs("spa", "eng", "test")
    assert len(bible) > 500
    with pytest.raises(XlpeftValueError, match="no embedded corpus pairs nah with eng"):
        corpus_pairs("nah", "eng", "test")


def fmt() -> Seq2SeqFormat:
    from tiny import tiny_config
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["__es__", "__en__"]})
    return Seq2SeqFormat.for_model(tiny_config("m2m_100"), tok)


def test_over_long_pairs_are_truncated_with_a_logged_count(caplog: pytest.LogCaptureFixture) -> None:
    f = fmt()
    long = " ".join(["hello world"] * 20)
    pairs = [Pair(long, "the book", "spa", "eng"), Pair("a book", "hello", "eng", "spa")]
    with caplog.at_level(logging.WARNING):
        rows = encode_pairs(f, pairs, 6, "train")
    assert "train: truncated 1 of 2 pairs longer than max_length=6 tokens" in caplog.text
    vocab = f.tokenizer.get_vocab()
    assert len(rows[0]["input_ids"]) == 6 and rows[0]["input_ids"][0] == vocab["__es__"]
    assert rows[0]["input_ids"][-1] == f.tokenizer.sep_token_id  # the end token survives the cut
    assert rows[0]["labels"][0] == vocab["__en__"]
    batch = Seq2SeqCollator(pad_id=0)(rows)
    assert batch["labels"][1].tolist().count(-100) == batch["labels"].shape[1] - len(rows[1]["labels"])
    assert batch["attention_mask"].sum(1).tolist() == [6, len(rows[1]["input_ids"])]
    assert batch["src_langs"] == ["spa", "eng"] and batch["references"] == ["the book", "hello"]


def test_without_language_tokens_labels_drop_the_decoder_start() -> None:
    from tiny import tiny_config
    f = Seq2SeqFormat.for_model(tiny_config("bert"), tiny_tokenizer())  # an encoder: bert2bert
    tok = f.tokenizer
    assert f.source_ids("hello", "eng")[0] == tok.cls_token_id
    assert f.target_ids("hello", "eng") == tok("hello")["input_ids"][1:]


def test_noise_is_seeded_and_changes_text() -> None:
    text = "one two three four five six seven eight nine ten"
    assert add_noise(text, 3, mask_token="<mask>") == add_noise(text, 3, mask_token="<mask>")
    assert add_noise(text, 3, mask_token="<mask>") != text


def test_datamodule_mixes_directions_with_temperature_and_denoising(tmp_path: Path) -> None:
    backbone = str(save_tiny_backbone(tmp_path / "bert"))
    big = ["the lord\tmungu"] * 30
    small = ["na\tand"] * 3
    (tmp_path / "big.tsv").write_text("\n".join(big))
    (tmp_path / "small.tsv").write_text("\n".join(small))
    files = {"eng-swh": {"train": str(tmp_path / "big.tsv")}, "swh-eng": {"train": str(tmp_path / "small.tsv")}}
    dm = ParallelDataModule(directions=["eng-swh", "swh-eng"], backbone=backbone, files=files, batch_size=66,
                            temperature=100.0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    share = batch["src_langs"].count("swh") / len(batch["src_langs"])
    assert 0.3 < share < 0.7, share  # T=100: nearly uniform over directions although 30:3 in size
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "src_langs", "tgt_langs", "references"}
    with pytest.raises(XlpeftValueError, match="`directions` or `denoise` must name at least one"):
        ParallelDataModule(directions=[], backbone=backbone)
