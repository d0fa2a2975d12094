"""MaskedLMAdaptation: routed multi-language MLM, masked-only logits, head calibration."""

from __future__ import annotations


import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_tiny import changed, perturb, save_tiny_backbone, snapshot, tiny_bert_tokenizer, tiny_trainer, write_bible_files
from xlpeft.data.collators import MLMCollator
from xlpeft.data.corpora import corpus_text
from xlpeft.data.datamodules import MLMDataModule
from xlpeft.errors import XlpeftValueError
from xlpeft.lightning import MaskedLMAdaptation

LANGS = ["eng", "swh"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("mlm") / "tiny-bert"))


@pytest.fixture(scope="module")
def text_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """40 real Bible lines per language (the same verses in English and Swahili)."""
    return write_bible_files(tmp_path_factory.mktemp("text"), LANGS)


def fixed_batch(seed: int = 3) -> dict:
    tok = tiny_bert_tokenizer()
    rows = [{"input_ids": tok(t, truncation=True, max_length=32)["input_ids"], "lang": lang}
            for lang in LANGS for t in corpus_text(lang, max_lines=4)]
    coll = MLMCollator(mask_id=tok.mask_token_id, pad_id=tok.pad_token_id, vocab_size=len(tok),
                       special_ids=tuple(tok.all_special_ids), seed=seed)
    return coll(rows)


def batch_loss(module: MaskedLMAdaptation, batch: dict) -> float:
    module.eval()
    with torch.no_grad():
        logits, targets, _ = module.masked_logits(batch)
    module.train()
    return float(F.cross_entropy(logits, targets))


def data(backbone: str, files: dict[str, str], **kwargs) -> MLMDataModule:
    return MLMDataModule(languages=LANGS, backbone=backbone, files=files, batch_size=8, max_length=32, **kwargs)


def test_routed_run_trains_only_the_language_adapters(backbone, text_files):
    L.seed_everything(0)
    module = MaskedLMAdaptation(backbone=backbone, languages=LANGS, lr=3e-2)
    batch = fixed_batch()
    before, loss_before = snapshot(module), batch_loss(module, batch)
    tiny_trainer(30, limit_val_batches=0).fit(module, data(backbone, text_files))
    moved = changed(before, module)
    assert moved, "training changed nothing"
    assert not any(k.startswith("adapted.model.") or k.startswith("head.") for k in moved), \
        "the backbone (and its MLM head) must stay bit-for-bit frozen"
    for lang in LANGS:
        assert any(f".{lang}." in k for k in moved), f"adapter {lang} did not train"
    assert all(f".{LANGS[0]}." in k or f".{LANGS[1]}." in k for k in moved)
    loss_after = batch_loss(module, batch)
    assert loss_after < loss_before - 0.2, (loss_before, loss_after)


def test_validate_and_test_report_per_language(backbone, text_files):
    module = MaskedLMAdaptation(backbone=backbone, languages=LANGS)
    dm = data(backbone, text_files)
    trainer = tiny_trainer(1)
    trainer.validate(module, dm, verbose=False)
    assert set(module.results) == set(LANGS)
    for row in module.results.values():
        assert set(row) == {"loss", "acc", "ppl", "tokens"} and row["tokens"] > 0
        assert row["ppl"] == pytest.approx(float(torch.tensor(row["loss"]).exp()), rel=1e-5)
    trainer.test(module, dm, verbose=False)
    assert "test/eng/loss" in trainer.callback_metrics and "val/eng/loss" not in trainer.callback_metrics


def test_text_files_split_three_ways_and_eval_masks_are_fixed(backbone, text_files):
    dm = data(backbone, text_files)
    dm.setup("fit")
    eng = [row["input_ids"] for row in dm.train_set if row["lang"] == "eng"]
    val = [row["input_ids"] for row in dm.val_set if row["lang"] == "eng"]
    test = [row["input_ids"] for row in dm.test_set if row["lang"] == "eng"]
    assert (len(eng), len(val), len(test)) == (36, 2, 2)
    assert not {tuple(x) for x in val} & {tuple(x) for x in test}, "validation and test must differ"
    loader = dm.val_dataloader()
    first, second = [b["labels"] for b in loader], [b["labels"] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "evaluation masks change between runs"


def test_masked_logits_equal_full_logits_at_masked_positions(backbone):
    module = MaskedLMAdaptation(backbone=backbone, languages=LANGS).eval()
    perturb(module.adapted, ("points.", "shared."))  # non-identity adapters
    batch = fixed_batch()
    where = batch["labels"] != -100
    with torch.no_grad():
        logits, targets, rows = module.masked_logits(batch)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        full = module.adapted(**inputs, adapters=batch["langs"]).logits
        bare = module.adapted(**inputs).logits
    torch.testing.assert_close(logits, full[where], rtol=1e-5, atol=1e-6)
    assert torch.equal(targets, batch["labels"][where])
    assert torch.equal(rows, where.nonzero()[:, 0])
    assert (logits - bare[where]).abs().max() > 1e-3, "the adapters must change the logits"


def test_unknown_language_and_bad_train_value(backbone):
    module = MaskedLMAdaptation(backbone=backbone, languages=LANGS)
    batch = fixed_batch()
    batch["langs"][0] = "fra"
    with pytest.raises(XlpeftValueError, match=r"no language adapter for \['fra'\]"):
        module.masked_logits(batch)
    with pytest.raises(XlpeftValueError, match="`train` can be 'adapters', 'head'; got 'all'"):
        MaskedLMAdaptation(backbone=backbone, languages=LANGS, train="all")


def test_head_calibration_trains_transform_and_bias_only(backbone, text_files):
    module = MaskedLMAdaptation(backbone=backbone, languages=LANGS, train="head", lr=1e-2)
    model = module.adapted.model
    assert module.adapted.adapter_names == []
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    before = snapshot(model)
    tiny_trainer(5, limit_val_batches=0).fit(module, data(backbone, text_files))
    moved = changed(before, model)
    assert {"cls.predictions.bias", "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.LayerNorm.weight"} <= moved
    assert all(k.startswith(("cls.predictions.transform.", "cls.predictions.bias",
                             "cls.predictions.decoder.bias")) for k in moved), moved
    assert "cls.predictions.decoder.weight" not in moved
    assert "bert.embeddings.word_embeddings.weight" not in moved


def test_ddp_without_find_unused_parameters_is_refused(backbone):
    module = MaskedLMAdaptation(backbone=backbone, languages=LANGS)
    module.trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=1, logger=False)
    with pytest.raises(XlpeftValueError, match="find_unused_parameters=True.*ddp_find_unused_parameters_true"):
        module.setup("fit")
    module.trainer = L.Trainer(strategy="ddp_find_unused_parameters_true", accelerator="cpu", devices=1,
                               logger=False)
    module.setup("fit")
