"""BAD-X bilingual adapters: pair sampling, per-pair routing, training only the pairs in the batch."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_tiny import changed, perturb, save_tiny_backbone, snapshot, tiny_bert_tokenizer, tiny_trainer, write_bible_files
from xlpeft.data.collators import MLMCollator
from xlpeft.data.corpora import corpus_text
from xlpeft.errors import XlpeftValueError
from xlpeft.lightning.bilingual import (BilingualMLM, BilingualMLMDataModule, check_shares, pair_adapter,
                                        pair_weights)

PAIRS = ["eng-swh", "eng-tgl"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("badx") / "tiny-bert"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_bible_files(tmp_path_factory.mktemp("text"), ["eng", "swh", "tgl"])


def batch_of(rows: list[tuple[str, str]], seed: int = 3) -> dict:
    """A collated MLM batch of (lang, pair adapter) rows, 2 real lines per row kind."""
    tok = tiny_bert_tokenizer()
    coll = MLMCollator(mask_id=tok.mask_token_id, pad_id=tok.pad_token_id, vocab_size=len(tok),
                       special_ids=tuple(tok.all_special_ids), seed=seed)
    items = [{"input_ids": tok(t, truncation=True, max_length=32)["input_ids"], "lang": lang, "pair": pair}
             for lang, pair in rows for t in corpus_text(lang, max_lines=2)]
    batch = coll(items)
    batch["pairs"] = [r["pair"] for r in items]
    return batch


def test_pair_weights_by_hand():
    # eng-swh: 3 eng + 1 swh lines; eng-tgl: 1 eng + 1 tgl; T = 1: pairs 4/6 and 2/6
    pairs = ["eng-swh"] * 4 + ["eng-tgl"] * 2
    langs = ["eng", "eng", "eng", "swh", "eng", "tgl"]
    w = pair_weights(pairs, langs, {"eng-swh": 0.75, "eng-tgl": 0.5}, temperature=1.0)
    expected = [4 / 6 * 0.75 / 3] * 3 + [4 / 6 * 0.25] + [2 / 6 * 0.5] * 2
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.double))
    # T → ∞: pairs equal, whatever their sizes
    w = pair_weights(pairs, langs, {"eng-swh": 0.75, "eng-tgl": 0.5}, temperature=1e9)
    torch.testing.assert_close(w[:4].sum(), w[4:].sum(), atol=1e-6, rtol=0)


def test_routing_by_pair_equals_each_pair_alone(backbone):
    torch.manual_seed(0)
    module = BilingualMLM(backbone, pairs=PAIRS, adapter="pfeiffer")
    perturb(module, ("adapted.points",), scale=0.3)  # non-identity adapters: routing shows
    module.eval()
    mixed = batch_of([("eng", "eng_swh"), ("eng", "eng_tgl"), ("swh", "eng_swh"), ("tgl", "eng_tgl")])
    with torch.no_grad():
        logits, targets, rows = module.masked_logits(mixed)
        hidden = {}
        for name in ("eng_swh", "eng_tgl"):
            out = module.adapted(input_ids=mixed["input_ids"], attention_mask=mixed["attention_mask"],
                                 adapters=name).logits
            hidden[name] = out
        alone = torch.stack([hidden[mixed["pairs"][r]][r, c] for r, c in zip(*torch.nonzero(mixed["labels"] != -100).T)])
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)
    # eng rows of the two pairs see different adapters: the pairs are really apart
    assert not torch.allclose(hidden["eng_swh"][0], hidden["eng_tgl"][0])


def test_a_step_trains_only_the_pairs_in_the_batch(backbone):
    torch.manual_seed(0)
    module = BilingualMLM(backbone, pairs=PAIRS, adapter="pfeiffer", lr=1e-2)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    before = snapshot(module)
    loss = torch.nn.functional.cross_entropy(*module.masked_logits(batch_of([("eng", "eng_swh"),
                                                                             ("swh", "eng_swh")]))[:2])
    loss.backward()
    optimizer.step()
    moved = changed(before, module)
    assert moved and all(".eng_swh." in k for k in moved), sorted(moved)[:5]


def test_fit_trains_both_pair_adapters_from_the_data_module(backbone, files, tmp_path):
    L.seed_everything(0)
    module = BilingualMLM(backbone, pairs=PAIRS, lr=3e-2)
    data = BilingualMLMDataModule(pairs=PAIRS, source_share=0.5, backbone=backbone, files=files,
                                  batch_size=8, max_length=32)
    before = snapshot(module)
    tiny_trainer(6, limit_val_batches=2, val_check_interval=6).fit(module, data)
    moved = changed(before, module)
    assert any(".eng_swh." in k for k in moved) and any(".eng_tgl." in k for k in moved)
    assert set(module.results) == {"eng", "swh", "tgl"}  # validation per language
    batch = next(iter(data.train_dataloader()))
    assert all(lang in pair.split("_") for lang, pair in zip(batch["langs"], batch["pairs"]))
    assert [p.name for p in module.export_adapters(tmp_path)] == ["eng_swh", "eng_tgl"]


def test_bad_inputs_are_refused(backbone):
    with pytest.raises(XlpeftValueError, match="non-empty list of 'src-tgt'"):
        BilingualMLMDataModule(pairs=[])
    with pytest.raises(XlpeftValueError, match="two different languages"):
        pair_adapter("eng-eng")
    with pytest.raises(XlpeftValueError, match="each pair once"):
        BilingualMLMDataModule(pairs=["eng-swh", "eng-swh"])
    with pytest.raises(XlpeftValueError, match=r"in \(0, 1\)"):
        check_shares(PAIRS, 1.0)
    with pytest.raises(XlpeftValueError, match="keys can be the pairs"):
        check_shares(PAIRS, {"eng-yor": 0.5})
    module = BilingualMLM(backbone, pairs=PAIRS[:1], adapter="pfeiffer")
    batch = batch_of([("eng", "eng_swh")])
    del batch["pairs"]
    with pytest.raises(XlpeftValueError, match="BilingualMLMDataModule"):
        module.masked_logits(batch)
