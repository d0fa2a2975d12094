"""Phylogeny adapters: lineage paths, routing by path == each path alone, training only the batch's paths."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_tiny import changed, perturb, save_tiny_backbone, snapshot, tiny_bert_tokenizer, tiny_trainer, write_bible_files
from xlpeft.core.composition import Stack
from xlpeft.data.collators import MLMCollator
from xlpeft.data.corpora import corpus_text
from xlpeft.data.datamodules import MLMDataModule
from xlpeft.errors import XlpeftKeyError, XlpeftValueError
from xlpeft.lightning.phylogeny import PhylogenyMLM, lineage_path, node_adapter

LANGS = ["eng", "spa", "ind"]  # Germanic and Italic under Indo-European; Austronesian apart


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("phylo") / "tiny-bert"))


@pytest.fixture(scope="module")
def module(backbone) -> PhylogenyMLM:
    torch.manual_seed(0)
    m = PhylogenyMLM(backbone, languages=LANGS, eval_languages=["deu"], adapter="pfeiffer")
    perturb(m, ("adapted.points",), scale=0.3)  # non-identity: every adapter on a path changes outputs
    return m


def batch_of(langs: list[str], seed: int = 3) -> dict:
    tok = tiny_bert_tokenizer()
    coll = MLMCollator(mask_id=tok.mask_token_id, pad_id=tok.pad_token_id, vocab_size=len(tok),
                       special_ids=tuple(tok.all_special_ids), seed=seed)
    return coll([{"input_ids": tok(t, truncation=True, max_length=32)["input_ids"], "lang": lang}
                 for lang in langs for t in corpus_text(lang, max_lines=2)])


def test_paths_follow_uriel_lineage():
    assert lineage_path("eng", 2) == ["family_Indo-European", "genus_Germanic"]
    assert lineage_path("spa", 1) == ["family_Indo-European"]
    assert node_adapter(1, "Nuclear Austronesian") == "genus_Nuclear_Austronesian"
    assert node_adapter(3, "Swahili (G.40)") == "clade3_Swahili_G_40"


def test_adapters_and_setups(module):
    names = set(module.adapted.adapter_names)
    assert names == {"family_Indo-European", "family_Austronesian", "genus_Germanic", "genus_Italic",
                     "genus_Nuclear_Austronesian", *LANGS}
    assert module.setup_for("eng") == Stack("family_Indo-European", "genus_Germanic", "eng")
    # zero-text: deu has no adapter of its own and runs the Germanic path alone
    assert module.setup_for("deu") == Stack("family_Indo-European", "genus_Germanic")
    assert module.setup_for("ita") == Stack("family_Indo-European", "genus_Italic")
    assert module.setup_for("rus") == "family_Indo-European"  # no Slavic genus was trained
    with pytest.raises(XlpeftKeyError, match="no adapter on the path of 'swh'"):
        module.setup_for("swh")


def test_routing_by_lineage_path_equals_each_path_alone(module):
    module.eval()
    batch = batch_of(["eng", "spa", "ind", "deu"])
    with torch.no_grad():
        logits, _, rows = module.masked_logits(batch)
        full = {}
        for lang in dict.fromkeys(batch["langs"]):
            full[lang] = module.adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        adapters=module.setup_for(lang)).logits
    where = torch.nonzero(batch["labels"] != -100)
    alone = torch.stack([full[batch["langs"][r]][r, c] for r, c in where.tolist()])
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)
    eng = module.adapted(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
                         adapters="eng").logits
    assert not torch.allclose(eng, full["eng"][:1], atol=1e-4)  # the tree adapters really act
    module.train()


def test_a_step_updates_exactly_the_adapters_on_the_batch_paths(backbone):
    torch.manual_seed(0)
    m = PhylogenyMLM(backbone, languages=LANGS, eval_languages=["deu"], adapter="pfeiffer")
    perturb(m, ("adapted.points",), scale=0.3)
    before = snapshot(m)
    loss = m.training_step(batch_of(["eng", "deu"]), 0)  # deu rows are dropped: never trained on
    loss.backward()
    torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1).step()
    moved = {k for key in changed(before, m) for k in key.split(".") if k in m.adapted.configs}
    assert moved == {"family_Indo-European", "genus_Germanic", "eng"}, moved
    assert m.training_step(batch_of(["deu"]), 0) is None  # a held-out-only batch: no step


def test_fit_routes_a_mixed_batch_and_validates_held_out_languages(backbone, tmp_path):
    L.seed_everything(0)
    files = write_bible_files(tmp_path, ["eng", "spa", "deu"])
    m = PhylogenyMLM(backbone, languages=["eng", "spa"], eval_languages=["deu"], adapter="pfeiffer", lr=3e-2)
    data = MLMDataModule(languages=["eng", "spa", "deu"], backbone=backbone, files=files, batch_size=8,
                         max_length=32)
    before = snapshot(m)
    tiny_trainer(4, limit_val_batches=2, val_check_interval=4).fit(m, data)
    moved = {k for key in changed(before, m) for k in key.split(".") if k in m.adapted.configs}
    assert moved == {"family_Indo-European", "genus_Germanic", "genus_Italic", "eng", "spa"}
    assert set(m.results) == {"eng", "spa", "deu"}
    exported = {p.name for p in m.export_adapters(tmp_path / "out")}
    assert exported == set(m.adapted.adapter_names)


def test_bad_arguments_are_refused(backbone):
    with pytest.raises(XlpeftValueError, match="not trained on"):
        PhylogenyMLM(backbone, languages=["eng"], eval_languages=["eng"])
    with pytest.raises(XlpeftValueError, match="`levels` can be an int >= 1"):
        PhylogenyMLM(backbone, languages=["eng"], levels=0)
    with pytest.raises(XlpeftKeyError, match="unknown language code 'zzz'"):
        lineage_path("zzz", 2)
    with pytest.raises(XlpeftValueError, match="one or more training language"):
        PhylogenyMLM(backbone, languages=[])


def test_the_task_step_runs_over_each_language_path(backbone, tmp_path):
    from xlpeft.lightning.phylogeny import PhylogenyTask

    torch.manual_seed(0)
    m = PhylogenyMLM(backbone, languages=["eng", "ind"], adapter="pfeiffer")
    folders = {p.name: str(p) for p in m.export_adapters(tmp_path)}
    task = PhylogenyTask(backbone, labels=["a", "b"], task_adapter="genre", source_language="eng",
                         language_adapters=folders)
    assert task.language_setup("eng", training=True) == Stack("family_Indo-European", "genus_Germanic", "eng", "genre")
    assert task.language_setup("tgl", training=False) == Stack("family_Austronesian", "genus_Nuclear_Austronesian",
                                                               "genre")  # zero-text: the path alone
    task.eval_mode = "source"
    assert task.language_setup("tgl", training=False) == task.language_setup("eng", training=True)
    task.eval_mode = "none"
    assert task.language_setup("tgl", training=False) == "genre"


def test_tree_only_paths_and_their_own_adapter_config(backbone):
    m = PhylogenyMLM(backbone, languages=["eng", "deu"], language_adapters=False, adapter="pfeiffer",
                     tree_adapter={"method": "lora", "r": 2})
    assert set(m.adapted.adapter_names) == {"family_Indo-European", "genus_Germanic"}
    assert m.setup_for("eng") == m.setup_for("deu") == Stack("family_Indo-European", "genus_Germanic")
    assert m.adapted.configs["genus_Germanic"].method == "lora"
