"""Hyper-X resume is exact: ``MLMAndTaskDataModule`` saves both inner data positions.

MLM: 24 lines (6 batches an epoch); task: 7 verses (2 batches, the second
partial), cycled by ``max_size_cycle``. A kill after step 5 leaves the task
loader in its third pass; 8 steps cross one epoch boundary. Before, the module
saved no position: the resumed run replayed epoch 0 of both loaders.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tiny import KillAt, Killed, save_tiny_backbone, tiny_trainer
from xlpeft.data.genre import GENRES
from xlpeft.data.resume import EpochSampler
from xlpeft.errors import CorruptFileError
from xlpeft.lightning.generator import HyperXTraining, MLMAndTaskDataModule

STEPS, KILL = 8, 5
SMALL = {"reduction_factor": 4, "language_dim": 8, "typology_hidden": 16}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("hyperx-resume") / "tiny-bert"))


def data(backbone: str) -> MLMAndTaskDataModule:
    return MLMAndTaskDataModule(languages=["swh"], task_language="eng", eval_languages=["eng"], backbone=backbone,
                                max_length=16, batch_size=4, max_train_lines=24, max_per_genre=1, seed=3)


def fit(backbone: str, root: Path, callbacks: list[L.Callback], ckpt_path: str | None = None,
        seed: int = 0) -> HyperXTraining:
    L.seed_everything(seed)
    module = HyperXTraining(backbone, languages=["swh"], task_languages=["eng"], labels=list(GENRES),
                            generator_config=SMALL, lr=1e-2)
    trainer = tiny_trainer(STEPS, limit_val_batches=0, callbacks=callbacks, default_root_dir=str(root),
                           enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer.fit(module, data(backbone), ckpt_path=ckpt_path)
    return module


def weights(m: HyperXTraining) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items() if v.is_floating_point()}


def test_hyperx_resume_after_a_mid_epoch_kill_is_bit_identical(backbone, tmp_path):
    want = weights(fit(backbone, tmp_path / "a", []))
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=KILL, save_top_k=-1,
                           filename="{step}")
    with pytest.raises(Killed):
        fit(backbone, tmp_path / "b", [ckpt, KillAt(KILL)])
    path = tmp_path / "ckpt" / f"step={KILL}.ckpt"
    saved = torch.load(str(path), weights_only=True)["MLMAndTaskDataModule"]
    assert saved["mlm"]["consumed_examples"] == saved["task"]["consumed_examples"] == KILL * 4
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    got = weights(fit(backbone, tmp_path / "c", [], ckpt_path=str(path), seed=123))
    assert want.keys() == got.keys()
    assert max(float((want[k] - got[k]).abs().max()) for k in want) == 0.0


def test_a_cycled_sampler_resumes_inside_a_later_pass():
    full = EpochSampler(7, batch_size=4, seed=1)
    passes = [list(full) for _ in range(3)]  # 2 batches a pass: 4 + 3
    resumed = EpochSampler(7, batch_size=4, seed=1)
    resumed.cycled = True
    resumed.resume(epoch=0, consumed=5 * 4)  # five batches: passes 0 and 1, then batch 0 of pass 2
    assert list(resumed) == passes[2][4:]
    assert list(resumed) == list(full)  # the cycle goes on: pass 3 of both
    assert passes[0] != passes[1]  # each pass has its own order and batch seeds


def test_a_foreign_data_position_is_refused(backbone):
    with pytest.raises(CorruptFileError, match="data position can be .*'mlm'.*another DataModule"):
        data(backbone).load_state_dict({"epoch": 0, "consumed_examples": 8})
