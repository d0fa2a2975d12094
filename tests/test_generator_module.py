"""Lightning training of generators: MAD-G by routed MLM, Hyper-X by task + MLM, checkpoints."""

from __future__ import annotations


import lightning as L
import pytest
import torch

from lightning_tiny import save_tiny_backbone, tiny_trainer, write_bible_files
from xlpeft.data.datamodules import MLMDataModule
from xlpeft.errors import IncompatibleAdapterError
from xlpeft.lightning.generator import GeneratorMLM, HyperXTraining

LANGS = ["eng", "swh"]
SMALL = {"reduction_factor": 4, "language_dim": 8, "typology_hidden": 16}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("gen") / "tiny-bert"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_bible_files(tmp_path_factory.mktemp("text"), LANGS)


def test_madg_trains_the_shared_generator_by_routed_mlm(backbone, files, tmp_path):
    L.seed_everything(0)
    module = GeneratorMLM(backbone, languages=LANGS, eval_languages=["tgl"], lr=1e-2,
                          generator_config={**SMALL, "basis": 4})
    before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    data = MLMDataModule(LANGS, backbone=backbone, files=files, batch_size=8, max_length=32)
    tiny_trainer(3, limit_val_batches=0, default_root_dir=str(tmp_path)).fit(module, data)
    after = module.generator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in module.adapted.model.parameters())
    assert "tgl" in module.adapted.configs  # held-out: generated, never trained on
    path = module.export_generator(tmp_path / "gen")
    again = GeneratorMLM(backbone, languages=LANGS, load_generator_from=str(path))
    assert all(torch.equal(a, b) for a, b in zip(again.generator.weights("tgl"), module.generator.weights("tgl")))
    other = save_tiny_backbone(tmp_path / "wide", hidden=48)
    with pytest.raises(IncompatibleAdapterError, match="hidden_size: file 32 vs model 48"):
        GeneratorMLM(str(other), languages=LANGS, load_generator_from=str(path))


def test_hyperx_trains_on_task_plus_mlm(backbone, files, tmp_path):
    L.seed_everything(0)
    module = HyperXTraining(backbone, languages=["swh"], task_languages=["eng"], labels=["a", "b"],
                            task="genre", generator_config=SMALL, lr=1e-2)
    assert {"swh", "eng_genre"} <= set(module.adapted.configs)
    tok_data = MLMDataModule(["swh"], backbone=backbone, files=files, batch_size=4, max_length=32)
    tok_data.setup("fit")
    mlm = next(iter(tok_data.train_dataloader()))
    task = {"input_ids": mlm["input_ids"], "attention_mask": mlm["attention_mask"],
            "labels": torch.tensor([0, 1, 0, 1])[: len(mlm["langs"])], "langs": ["eng"] * len(mlm["langs"])}
    module.train()
    before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):  # zero-init up-projections: the embeddings get gradient from step 2 on
        opt.zero_grad()
        module.training_step({"mlm": mlm, "task": task}, step).backward()
        opt.step()
    assert not torch.equal(before["task_embedding.weight"], module.generator.task_embedding.weight)
    assert module.task_logits({**task, "langs": ["quy"] * len(task["langs"])}).shape == (len(task["langs"]), 2)
    assert "quy_genre" in module.adapted.configs  # an unseen language gets a generated task adapter
