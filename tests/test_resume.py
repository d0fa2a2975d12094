"""A resumed run is the run it resumes: bit-identical adapters after a kill and ``ckpt_path``.

The old loaders replayed epoch 0 after a resume (a sampler generator seeded
once per process), masking and dropout drew from a global RNG nobody saved,
and all 32 adapter tensors ended up to 0.04 away from the uninterrupted run.
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
from xlpeft.data.datamodules import MLMDataModule
from xlpeft.data.resume import EpochSampler, KeyedDataset
from xlpeft.lightning import MaskedLMAdaptation

LANGS = ["eng", "swh"]
TEXT = {"eng": ["the lord said unto them", "and he shall be with him", "thou shall not", "in the beginning"],
        "swh": ["hapo mwanzo mungu", "na nchi ya maji", "juu ya uso wa maji", "mungu katika nchi"]}
STEPS = 14  # 36 training lines, batch 4: 9 batches an epoch, so 14 steps cross one epoch boundary


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    save_tiny_backbone(root / "tiny-bert")  # dropout 0.1: the global RNG matters
    for lang, lines in TEXT.items():
        (root / f"{lang}.txt").write_text("\n".join(lines * 5) + "\n", encoding="utf-8")
    return root


def data(root: Path) -> MLMDataModule:
    files = {lang: str(root / f"{lang}.txt") for lang in LANGS}
    return MLMDataModule(languages=LANGS, backbone=str(root / "tiny-bert"), files=files, batch_size=4,
                         max_length=16, seed=3)


def adapters(m: MaskedLMAdaptation) -> dict[str, torch.Tensor]:
    return {f"{lang}/{k}": v.detach().clone() for lang in LANGS
            for k, v in m.adapted.adapter_state_dict(lang).items()}


def fit(root: Path, callbacks: list[L.Callback], ckpt_path: str | None = None, seed: int = 0) -> MaskedLMAdaptation:
    L.seed_everything(seed)
    module = MaskedLMAdaptation(backbone=str(root / "tiny-bert"), languages=LANGS, lr=1e-2, warmup_steps=2)
    trainer = tiny_trainer(STEPS, limit_val_batches=1, num_sanity_val_steps=1, callbacks=callbacks,
                           enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                           default_root_dir=str(root))
    trainer.fit(module, data(root), ckpt_path=ckpt_path)
    return module


@pytest.fixture(scope="module")
def uninterrupted(root: Path) -> dict[str, torch.Tensor]:
    return adapters(fit(root, []))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and len(a) == 32
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("kill", [5, 9], ids=["mid-epoch", "epoch-boundary"])
def test_resume_after_a_kill_is_bit_identical(root, uninterrupted, kill, tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=kill, save_top_k=-1, filename="{step}")
    with pytest.raises(Killed):
        fit(root, [ckpt, KillAt(kill)])
    path = tmp_path / f"step={kill}.ckpt"
    assert path.is_file()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # whatever the new process starts with
    resumed = fit(root, [], ckpt_path=str(path), seed=123)
    assert max_diff(uninterrupted, adapters(resumed)) == 0.0


def test_two_uninterrupted_runs_agree_and_training_moves_the_adapters(root, uninterrupted):
    again = fit(root, [])
    assert max_diff(uninterrupted, adapters(again)) == 0.0
    L.seed_everything(0)
    fresh = MaskedLMAdaptation(backbone=str(root / "tiny-bert"), languages=LANGS)
    assert max_diff(uninterrupted, adapters(fresh)) > 1e-3


def test_epoch_order_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(10, batch_size=3, seed=1)
    first = [i for i, _ in sampler]
    assert sorted(first) == list(range(10))
    sampler.set_epoch(1)
    second = [i for i, _ in sampler]
    assert second != first and sorted(second) == list(range(10))
    other = EpochSampler(10, batch_size=3, seed=1)
    other.set_epoch(1)
    assert [i for i, _ in other] == second  # a new process gets the same epoch-1 order


def test_a_restored_sampler_skips_the_consumed_batches_and_keeps_the_batch_seeds():
    full = list(EpochSampler(10, batch_size=3, seed=1, weights=torch.ones(10)))
    resumed = EpochSampler(10, batch_size=3, seed=1, weights=torch.ones(10))
    resumed.resume(epoch=0, consumed=6)  # two batches of three
    assert list(resumed) == full[6:]
    done = EpochSampler(10, batch_size=3, seed=1)
    done.resume(epoch=0, consumed=10)  # the epoch was complete: the next one starts
    nxt = EpochSampler(10, batch_size=3, seed=1)
    nxt.set_epoch(1)
    assert list(done) == list(nxt)
    seeds = {seed for _, seed in full[:3]}
    assert len(seeds) == 1 and seeds != {seed for _, seed in full[3:6]}  # one seed per batch


def test_keyed_rows_carry_their_batch_seed():
    rows = KeyedDataset([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert rows[(1, 77)] == {"input_ids": [3], "batch_seed": 77}


def run_ddp(out: Path, *args: str) -> str:
    import os
    import signal
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(root / "tests" / "ddp_resume_worker.py"), str(out), *args],
                            cwd=str(root), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        return proc.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"DDP resume worker hung; output ends:\n{proc.communicate()[0][-3000:]}")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available in this build")
def test_ddp_resume_after_a_kill_is_bit_identical(tmp_path):
    from safetensors.torch import load_file
    full = run_ddp(tmp_path, "full")
    assert "rank 0 full done at step 8" in full, full[-3000:]
    killed = run_ddp(tmp_path, "kill", "3")
    assert (tmp_path / "ckpt" / "killed.ckpt").is_file(), killed[-3000:]
    resumed = run_ddp(tmp_path, "resume", "3")
    assert "rank 0 resume done at step 8" in resumed and "rank 1 resume done at step 8" in resumed, resumed[-3000:]
    a, b = load_file(str(tmp_path / "full.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert max_diff(a, b) == 0.0


def cli_config(root: Path, tmp_path: Path, callbacks: list[dict]) -> Path:
    import yaml
    tiny = str(root / "tiny-bert")
    config = {
        "seed_everything": 0,
        "model": {"class_path": "xlpeft.lightning.MaskedLMAdaptation",
                  "init_args": {"backbone": tiny, "languages": LANGS, "lr": 1e-2, "warmup_steps": 2}},
        "data": {"class_path": "xlpeft.data.datamodules.MLMDataModule",
                 "init_args": {"backbone": tiny, "languages": LANGS, "batch_size": 4, "max_length": 16, "seed": 3,
                               "files": {lang: str(root / f"{lang}.txt") for lang in LANGS}}},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": STEPS, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 1,
                    "enable_checkpointing": bool(callbacks), "callbacks": callbacks,
                    "default_root_dir": str(tmp_path)},
    }
    path = tmp_path / f"config{len(callbacks)}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_cli_fit_ckpt_path_resume_is_bit_identical(root, tmp_path):
    """The reported case: ``xlpeft fit --ckpt_path`` after a kill."""
    from xlpeft.lightning.cli import cli
    full = cli(["fit", "--config", str(cli_config(root, tmp_path, []))])
    kill = 5
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": kill, "save_last": True}},
                 {"class_path": "test_resume.KillAt", "init_args": {"step": kill}}]
    with pytest.raises(Killed):
        cli(["fit", "--config", str(cli_config(root, tmp_path, callbacks))])
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    resumed = cli(["fit", "--config", str(cli_config(root, tmp_path, [])), "--seed_everything=7",
                   f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}"])
    assert resumed.trainer.global_step == STEPS
    assert max_diff(adapters(full.model), adapters(resumed.model)) == 0.0
