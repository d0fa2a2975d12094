"""TranslationAdaptation on tiny random backbones of every seq2seq family.

Per-example routing (encoder by source, decoder by target) in training and
generation, equivalence of a mixed-direction batch with each direction alone,
gradients only for the modules of the directions in the batch, save/load,
forced language tokens and the error messages.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from tiny import SEQ2SEQ_FAMILIES, perturb, tiny_model, tiny_tokenizer
from xlpeft.core.composition import Stack
from xlpeft.data.parallel import Pair, Seq2SeqCollator, encode_pairs
from xlpeft.errors import XlpeftKeyError, XlpeftValueError
from xlpeft.lightning.translation import TranslationAdaptation

LANG_TOKENS = ["__en__", "__es__", "__nah__", "en_XX", "es_XX", "nah_XX"]
"""Language tokens the tiny tokenizer knows (no Otomí: that is the missing-token case)."""
LANGS = ["spa", "nah", "ote", "eng"]
PAIRS = [Pair("hello world", "habari ya dunia", "spa", "nah"), Pair("habari dunia", "the book", "nah", "spa"),
         Pair("read the book", "kitabu", "spa", "eng"), Pair("a book", "hello", "eng", "spa")]


def tokenizer():
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": LANG_TOKENS})
    return tok


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tiny model + tokenizer (with language tokens) per family."""
    root = tmp_path_factory.mktemp("nmt")
    out = {}
    for family in SEQ2SEQ_FAMILIES:
        path = root / family
        tiny_model(family, "seq2seq").save_pretrained(path)
        tokenizer().save_pretrained(path)
        out[family] = path
    return out


def module(folder: Path, seed: int = 0, **kw) -> TranslationAdaptation:
    kw = {"modules": "monolingual", "languages": LANGS, "adapter": "houlsby", **kw}
    m = TranslationAdaptation(backbone=str(folder), **kw)
    for i, name in enumerate(m.adapted.adapter_names):
        perturb(m.adapted, name, scale=0.5, seed=seed + i)
    return m.eval()


def batch_of(m: TranslationAdaptation, pairs: list[Pair]) -> dict:
    rows = encode_pairs(m.format, pairs, 16, "test")
    return Seq2SeqCollator(m.format.tokenizer.pad_token_id)(rows)


@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
def test_mixed_directions_equal_each_direction_alone(family: str, folders: dict) -> None:
    m = module(folders[family], train_backbone="none")
    batch = batch_of(m, PAIRS)
    with torch.no_grad():
        logits, losses = m(batch), m.token_losses(batch)
    for i, pair in enumerate(PAIRS):
        one = batch_of(m, [pair])
        n = one["labels"].shape[1]
        with torch.no_grad():
            torch.testing.assert_close(logits[i, :n], m(one)[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(losses[i, :n], m.token_losses(one)[0], rtol=1e-4, atol=1e-4)
    bare = module(folders[family], modules="none")
    with torch.no_grad():
        assert not torch.allclose(bare(batch), logits, atol=1e-3)  # the modules act


@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
def test_generation_with_mixed_targets_equals_per_language_generation(family: str, folders: dict) -> None:
    m = module(folders[family])
    batch = batch_of(m, PAIRS)
    kw = {"max_new_tokens": 5, "min_new_tokens": 5}
    mixed = m.generate_ids(batch, **kw)
    for i, pair in enumerate(PAIRS):
        assert torch.equal(mixed[i], m.generate_ids(batch_of(m, [pair]), **kw)[0]), pair
    with torch.no_grad():
        flipped = dict(batch, tgt_langs=["eng"] * len(PAIRS), src_langs=["eng"] * len(PAIRS))
        assert not torch.equal(m.generate_ids(flipped, **kw), mixed)  # the adapters change the output


@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
def test_encoder_routes_by_source_and_decoder_by_target(family: str, folders: dict) -> None:
    m = module(folders[family])
    batch = batch_of(m, PAIRS[:2])  # spa→nah, nah→spa
    with torch.no_grad():
        before = m(batch)
        for key, point in m.adapted.points.items():  # change only the decoder half of `nah`
            if key.startswith("decoder") and "nah" in point.adapters:
                for p in point.adapters["nah"].parameters():
                    p.add_(0.5)
        after = m(batch)
    assert not torch.allclose(before[0], after[0], atol=1e-4)  # target nah: decoder nah ran
    torch.testing.assert_close(before[1], after[1])  # source nah: only its encoder half ran
    enc, dec = m.setups(["spa", "nah"], ["nah", "spa"])
    assert (enc, dec) == (["spa", "nah"], ["nah", "spa"])


def _has_grad(m: TranslationAdaptation, name: str, stack: str) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for key, point in m.adapted.points.items()
               if key.startswith(stack) and name in point.adapters for p in point.adapters[name].parameters())


@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
def test_gradients_reach_only_the_modules_of_the_directions_in_the_batch(family: str, folders: dict) -> None:
    m = module(folders[family]).train()
    m.training_step(batch_of(m, [PAIRS[0], PAIRS[0]]), 0).backward()  # spa→nah only
    assert _has_grad(m, "spa", "encoder") and _has_grad(m, "nah", "decoder")
    assert not _has_grad(m, "spa", "decoder") and not _has_grad(m, "nah", "encoder")
    assert not any(_has_grad(m, lang, s) for lang in ("ote", "eng") for s in ("encoder", "decoder"))
    assert all(p.grad is None for p in m.adapted.model.parameters())


@pytest.mark.parametrize("family", ["m2m_100", "encoder-decoder"])
def test_save_and_load_language_modules(family: str, folders: dict, tmp_path: Path) -> None:
    m = module(folders[family], seed=3)
    m.export_adapters(tmp_path)
    loaded = TranslationAdaptation(backbone=str(folders[family]), modules="monolingual",
                                   language_adapters={n: str(tmp_path / n) for n in LANGS}).eval()
    batch = batch_of(m, PAIRS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), m(batch))
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded modules stay frozen by default


@pytest.mark.parametrize("family, prefix", [("m2m_100", "__{}__"), ("mbart", "{}_XX")])
def test_language_token_is_forced_where_the_family_needs_one(family: str, prefix: str, folders: dict) -> None:
    m = module(folders[family])
    vocab = m.format.tokenizer.get_vocab()
    batch = batch_of(m, PAIRS[:2])
    assert batch["input_ids"][0, 0] == vocab[prefix.format("es")]  # source tag: spa
    assert batch["labels"][0, 0] == vocab[prefix.format("nah")]  # target tag: nah
    start = m.adapted.model.config.decoder_start_token_id
    assert m.decoder_prefix(["nah", "spa"], torch.device("cpu")).tolist() == [
        [start, vocab[prefix.format("nah")]], [start, vocab[prefix.format("es")]]]
    enc, dec = m.setups(batch["src_langs"], batch["tgt_langs"])
    full = m.adapted.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              decoder_input_ids=m.decoder_prefix(batch["tgt_langs"], torch.device("cpu")),
                              adapters=enc, decoder_adapters=dec, max_new_tokens=3)
    assert full[:, 1].tolist() == [vocab[prefix.format("nah")], vocab[prefix.format("es")]]


@pytest.mark.parametrize("family", ["mt5", "marian", "encoder-decoder"])
def test_families_without_language_tokens_start_from_the_decoder_start_only(family: str, folders: dict) -> None:
    m = module(folders[family])
    assert m.decoder_prefix(["nah"], torch.device("cpu")).shape == (1, 1)
    assert m.format.lang_id("nah") is None


def test_pair_modules_route_by_direction(folders: dict) -> None:
    m = module(folders["mbart"], modules="pair", directions=["spa-nah", "nah-spa"])
    assert sorted(m.adapted.adapter_names) == ["nah_spa", "spa_nah"]
    assert m.setups(["spa", "nah"], ["nah", "spa"]) == (["spa_nah", "nah_spa"], ["spa_nah", "nah_spa"])
    with pytest.raises(XlpeftKeyError, match="no pair module for direction 'spa-eng': modules can be spa_nah, nah_spa; got 'spa_eng'"):
        m.setups(["spa"], ["eng"])


def test_shared_module_stacks_under_every_language_and_cross_attention_tuning(folders: dict) -> None:
    shared = {"xattn": {"method": "lora", "targets": ["cross_q", "cross_v"], "r": 2}}
    m = module(folders["m2m_100"], shared=shared).train()
    enc, dec = m.setups(["spa"], ["nah"])
    assert (enc, dec) == ([Stack("spa", "xattn")], [Stack("nah", "xattn")])
    m.training_step(batch_of(m, PAIRS[:1]), 0).backward()
    assert _has_grad(m, "xattn", "decoder") and not _has_grad(m, "xattn", "encoder")
    gheini = TranslationAdaptation(backbone=str(folders["m2m_100"]), modules="none", train_backbone="cross-attention")
    names = [n for n, p in gheini.named_parameters() if p.requires_grad]
    assert names and all("encoder_attn" in n for n in names)


def test_bad_input_is_refused_with_what_to_do(folders: dict) -> None:
    m = module(folders["m2m_100"], languages=["spa", "nah"])
    with pytest.raises(XlpeftKeyError, match=r"no monolingual module for the target of direction 'spa-ote': "
                       r"modules can be spa, nah; got 'ote'\. Add it to `languages`"):
        m.setups(["spa"], ["ote"])
    with pytest.raises(XlpeftKeyError, match="has no language token for 'ote' \\(tried __ote__\\).*__en__, __es__"):
        m.decoder_prefix(["ote"], torch.device("cpu"))
    with pytest.raises(XlpeftValueError, match="`modules` can be monolingual, pair, none; got 'per-language'"):
        TranslationAdaptation(backbone=str(folders["mt5"]), modules="per-language")
    with pytest.raises(XlpeftValueError, match="`train_backbone` can be none, all, decoder, cross-attention; got 'x'"):
        TranslationAdaptation(backbone=str(folders["mt5"]), train_backbone="x")


def test_fit_on_files_with_a_warm_started_encoder(tmp_path: Path) -> None:
    """Two Lightning steps + validation (BLEU/chrF per direction) + base export, from a BERT folder."""
    from lightning_tiny import save_tiny_backbone
    from xlpeft.data.parallel_datamodule import ParallelDataModule

    backbone = str(save_tiny_backbone(tmp_path / "bert"))
    lines = ["the lord\tmungu", "all of them\tna wa", "he is not\tya za", "in the land\tkatika nchi"] * 3
    (tmp_path / "eng-swh.tsv").write_text("\n".join(lines) + "\n")
    files = {"eng-swh": {s: str(tmp_path / "eng-swh.tsv") for s in ("train", "validation", "test")}}
    data = ParallelDataModule(directions=["eng-swh"], backbone=backbone, files=files, batch_size=4)
    model = TranslationAdaptation(backbone=backbone, languages=["eng", "swh"], train_backbone="cross-attention",
                                  decoder_layers=1, max_new_tokens=4, export_model=str(tmp_path / "base"))
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=data)
    trainer.validate(model, datamodule=data, verbose=False)
    assert set(model.results) == {"eng-swh"} and {"bleu", "chrf", "loss"} <= set(model.results["eng-swh"])
    assert 0 <= model.results["eng-swh"]["chrf"] <= 100
    assert (tmp_path / "base" / "config.json").is_file()
    reloaded = TranslationAdaptation(backbone=str(tmp_path / "base"), modules="none")
    assert type(reloaded.adapted.model).__name__ == "EncoderDecoderModel"
