"""LaSS: masked forward == materialised sub-network, grouping by direction, untouched weights, search, files."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tiny import tiny_model, tiny_tokenizer
from xlpeft.data.parallel import Pair, Seq2SeqCollator, encode_pairs
from xlpeft.errors import CorruptFileError, XlpeftKeyError, XlpeftValueError
from xlpeft.lightning.lass import WEIGHTS_NAME, LassTranslation
from xlpeft.lightning.translation import TranslationAdaptation
from xlpeft.methods.lass import LassConfig, keep_indices

DIRECTIONS = ["spa-nah", "nah-spa", "spa-eng"]
PAIRS = [Pair("hello world", "habari ya dunia", "spa", "nah"), Pair("habari dunia", "the book", "nah", "spa"),
         Pair("read the book", "kitabu", "spa", "eng"), Pair("a book", "hello world", "spa", "nah")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lass") / "m2m"
    tiny_model("m2m_100", "seq2seq").save_pretrained(path)
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["__en__", "__es__", "__nah__"]})
    tok.save_pretrained(path)
    return path


def random_masks(m: LassTranslation, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    m.masks.set({d: {n: keep_indices(torch.rand(w.shape, generator=gen), m.masks.indices(d, n).numel())
                     for n, w in m.targets.items()} for d in DIRECTIONS})


def lass(folder: Path, **kw) -> LassTranslation:
    torch.manual_seed(0)
    m = LassTranslation(backbone=str(folder), directions=DIRECTIONS, **{"prune": 0.5, **kw})
    return m


def batch_of(m: TranslationAdaptation, pairs: list[Pair]) -> dict:
    return Seq2SeqCollator(m.format.tokenizer.pad_token_id)(encode_pairs(m.format, pairs, 16, "test"))


def test_config_and_indices_by_hand():
    assert keep_indices(torch.tensor([[0.1, -5.0], [3.0, 0.2]]).abs(), 2).tolist() == [1, 2]
    assert keep_indices(torch.zeros(5), 2).tolist() == [0, 1]  # ties: lower index first
    assert LassConfig(prune=0.3, directions=("a-b",)).kept(10) == 7
    with pytest.raises(XlpeftValueError, match=r"`prune` can be a share in \[0, 1\)"):
        LassConfig(prune=1.0, directions=("a-b",))
    with pytest.raises(XlpeftValueError, match="`criterion` can be"):
        LassConfig(criterion="random", directions=("a-b",))
    with pytest.raises(XlpeftValueError, match="one or more 'src-tgt'"):
        LassConfig()


def test_masked_forward_equals_the_materialised_sub_network(folder):
    m = lass(folder).eval()
    random_masks(m)
    batch = batch_of(m, [PAIRS[0], PAIRS[3]])  # spa-nah only
    twin = copy.deepcopy(m)
    with torch.no_grad():
        for name, w in twin.targets.items():
            w.mul_(twin.masks.dense("spa-nah", name, w.device))
        expected = TranslationAdaptation.forward(twin, batch)  # the plain forward of the pruned copy
        got = m(batch)
        full = TranslationAdaptation.forward(m, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)  # the mask acts


def test_a_mixed_batch_groups_by_direction(folder):
    m = lass(folder).eval()
    random_masks(m)
    batch = batch_of(m, PAIRS)
    kw = {"max_new_tokens": 4, "min_new_tokens": 4}
    with torch.no_grad():
        logits, ids = m(batch), m.generate_ids(batch, **kw)
        for i, pair in enumerate(PAIRS):
            one = batch_of(m, [pair])
            n = one["labels"].shape[1]
            torch.testing.assert_close(logits[i, :n], m(one)[0], rtol=1e-4, atol=1e-4)
            assert torch.equal(ids[i], m.generate_ids(one, **kw)[0])


def loader(batches: list[dict]) -> DataLoader:
    """Fixed batches in order, as a DataLoader."""
    return DataLoader(batches, batch_size=1, collate_fn=lambda rows: rows[0])


class Watch(L.Callback):
    """Weights before and after the second step (a batch of one direction after a step of another)."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 1:
            self.before = {n: w.detach().clone() for n, w in module.targets.items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 1:
            self.after = {n: w.detach().clone() for n, w in module.targets.items()}


def test_training_under_a_mask_keeps_every_weight_outside_it_bit_identical(folder):
    m = lass(folder, lr=1e-2, weight_decay=0.1)  # AdamW decay and momentum would move every entry
    random_masks(m)
    batches = [batch_of(m, [PAIRS[1]]), batch_of(m, [PAIRS[0], PAIRS[3]])]  # nah-spa, then spa-nah
    watch = Watch()
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[watch]).fit(m, train_dataloaders=loader(batches))
    inside = outside_moved = 0
    for name in m.targets:
        mask = m.masks.dense("spa-nah", name, torch.device("cpu"))
        before, after = watch.before[name], watch.after[name]
        assert torch.equal(before[~mask], after[~mask]), name  # bit-identical outside spa-nah's mask
        inside += int((before[mask] != after[mask]).sum())
        other = m.masks.dense("nah-spa", name, torch.device("cpu")) & ~mask
        outside_moved += int(other.sum())
    assert inside > 0  # the sub-network trained
    assert outside_moved > 0  # nah-spa's own entries (with Adam state from step 1) exist and were kept


def test_search_restores_theta_and_follows_the_criterion(folder):
    batches = [lambda m: [batch_of(m, PAIRS)]][0]
    m = lass(folder, search_steps=2, search_lr=0.0)  # lr 0: θ_d = θ, so scores are known by hand
    theta = {n: w.detach().clone() for n, w in m.targets.items()}
    m.search_masks(lambda: batches(m))
    for name, w in m.targets.items():
        assert torch.equal(w, theta[name])
        for d in DIRECTIONS:
            assert torch.equal(m.masks.indices(d, name), keep_indices(theta[name].abs(), w.numel() // 2))
    c = lass(folder, search_steps=1, search_lr=0.0, criterion="change")
    c.search_masks(lambda: batches(c))
    name = next(iter(c.targets))
    assert c.masks.indices("spa-eng", name).tolist() == list(range(c.targets[name].numel() // 2))
    t = lass(folder, search_steps=2, search_lr=1e-2)
    t.search_masks(lambda: batches(t))
    assert any(not torch.equal(t.masks.indices("spa-nah", n), t.masks.indices("spa-eng", n)) for n in t.targets)
    with pytest.raises(XlpeftValueError, match="no pair of direction 'spa-eng'"):
        lass(folder, search_steps=1).search_masks(lambda: [batch_of(m, PAIRS[:2])])


def test_masks_save_and_load_as_index_files(folder, tmp_path):
    m = lass(folder)
    random_masks(m, seed=3)
    path = m.save_masks(tmp_path / "masks")
    other = lass(folder, masks=str(path))
    for d in DIRECTIONS:
        for n in m.targets:
            assert torch.equal(other.masks.indices(d, n), m.masks.indices(d, n))
    m.save_masks(path)  # replacing its own artefact is allowed (atomic)
    with pytest.raises(XlpeftValueError, match="pruned at 0.5"):
        lass(folder, masks=str(path), prune=0.3)
    with pytest.raises(XlpeftValueError, match="no sub-network for"):
        LassTranslation(backbone=str(folder), directions=["eng-spa"], prune=0.5, masks=str(path))
    blob = bytearray((path / WEIGHTS_NAME).read_bytes())
    blob[-1] ^= 1
    (path / WEIGHTS_NAME).write_bytes(bytes(blob))
    with pytest.raises(CorruptFileError, match="sha256"):
        lass(folder, masks=str(path))
    with pytest.raises(XlpeftValueError, match="not a lass_masks directory"):
        lass(folder, masks=str(tmp_path))


def test_unknown_direction_and_missing_data_are_refused(folder):
    m = lass(folder).eval()
    random_masks(m)
    with pytest.raises(XlpeftKeyError, match="no LaSS sub-network for direction 'eng-spa'"):
        m(batch_of(m, [Pair("the book", "hello", "eng", "spa")]))
    fresh = lass(folder)
    with pytest.raises(XlpeftValueError, match="reads the training data from a DataModule"):
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(fresh, train_dataloaders=loader([batch_of(fresh, PAIRS)]))
