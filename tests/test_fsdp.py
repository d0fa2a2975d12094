"""Sharded (FSDP) models: detection, refusal of merges on shards, adapter export of full weights.

Two CPU processes (gloo): this file run as a script is the worker; each rank
holds half of every flat parameter, the export gathers and rank 0 writes the
full adapter, a LoRA merge inside ``full_weights(writeback=True)`` reaches the
shards and gives the outputs of the same merge unsharded.

CPU: one process (gloo, world size 1) wraps an ``AdaptedModel`` in FSDP1 (explicit
``device_id=cpu``): parameters become flat-parameter views, so the gather/export
path is that of a real run, without a second rank. FSDP2 (``fully_shard``, DTensor)
is detected and refused.
GPU (skipped without CUDA): a Lightning ``FSDPStrategy`` run trains adapters and
writes adapter-only files and checkpoints (Lightning refuses FSDPStrategy on CPU).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from lightning_tiny import save_tiny_backbone
from tiny import perturb, tiny_batch, tiny_model
from xlpeft import AdaptedModel
from xlpeft.errors import XlpeftValueError
from xlpeft.lightning.sharded import check_full_weights, full_weights, is_sharded

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def _model() -> AdaptedModel:
    am = AdaptedModel(tiny_model("bert", "base"))
    am.add_adapter("swh", "pfeiffer")
    perturb(am, "swh")
    am.train_adapters("swh")
    return am


def _wrap(am: AdaptedModel, kind: str) -> torch.nn.Module:
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        return FSDP(am, device_id=torch.device("cpu"), use_orig_params=True)
    from torch.distributed.fsdp import fully_shard
    return fully_shard(am)


@pytest.mark.parametrize("kind", ["fsdp1"])
def test_sharded_weights_are_detected_merges_refused_and_export_gathers(group, kind, tmp_path):
    plain = _model()
    assert not is_sharded(plain)
    check_full_weights(plain, "merge")  # plain models pass
    expected = {k: v.detach().clone() for k, v in plain.adapter_state_dict("swh").items()}
    am = _model()
    wrapped = _wrap(am, kind)
    assert is_sharded(wrapped)
    with pytest.raises(XlpeftValueError, match="`merge` needs full weights.*FSDP shards"):
        check_full_weights(wrapped, "merge")
    batch = tiny_batch(am.model)
    wrapped(**batch, adapters=["swh"] * 4).last_hidden_state.sum().backward()  # trains through shards
    with full_weights(wrapped):
        am.save_adapter("swh", str(tmp_path / "swh"))
    saved = load_file(str(tmp_path / "swh" / "adapter_model.safetensors"))
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved), "export must hold the full tensors"


def test_fsdp2_is_detected_and_refused_with_what_to_do(group):
    wrapped = _wrap(_model(), "fsdp2")
    assert is_sharded(wrapped)
    with pytest.raises(XlpeftValueError, match="`merge` needs full weights"):
        check_full_weights(wrapped, "merge")
    with pytest.raises(XlpeftValueError, match="FSDP1.*got an FSDP2.*get_model_state_dict"):
        with full_weights(wrapped):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy needs a CUDA device")
def test_lightning_fsdp_run_writes_adapter_only_files(tmp_path):
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_tiny import write_bible_files
    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning import AdapterExport, MaskedLMAdaptation

    backbone = str(save_tiny_backbone(tmp_path / "bb"))
    files = write_bible_files(tmp_path / "text", ["eng", "swh"])
    L.seed_everything(0)
    module = MaskedLMAdaptation(backbone=backbone, languages=["eng", "swh"], lr=1e-2)
    data = MLMDataModule(["eng", "swh"], backbone=backbone, files=files, batch_size=4, max_length=16)
    trainer = L.Trainer(strategy=FSDPStrategy(), accelerator="cuda", devices=1, max_steps=3, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(tmp_path),
                        callbacks=[AdapterExport(dirpath=str(tmp_path / "adapters"))])
    trainer.fit(module, data)
    assert is_sharded(trainer.model)
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["eng", "swh"]
    trainer.save_checkpoint(str(tmp_path / "last.ckpt"))
    state = torch.load(str(tmp_path / "last.ckpt"), weights_only=True, map_location="cpu")["state_dict"]
    assert state and all(".eng." in k or ".swh." in k or "shared." in k for k in state), sorted(state)[:5]
    with pytest.raises(XlpeftValueError, match="`merge` needs full weights"):
        check_full_weights(trainer.model, "merge")


def test_merge_inside_full_weights_with_write_back_reaches_the_shards(group):
    """FSDP1: merging a LoRA adapter inside ``full_weights(writeback=True)`` equals merging unsharded."""
    def lora() -> AdaptedModel:
        am = AdaptedModel(tiny_model("bert", "base"))
        am.add_adapter("fix", "lora")
        perturb(am, "fix")
        return am.eval()

    plain, am = lora(), lora()
    batch = tiny_batch(plain.model)
    with torch.no_grad():
        want = plain(**batch, adapters=["fix"] * 4).last_hidden_state
        plain.merge("fix")
        merged_plain = plain(**batch).last_hidden_state
    torch.testing.assert_close(merged_plain, want, rtol=1e-4, atol=1e-5)
    wrapped = _wrap(am, "fsdp1")
    with full_weights(wrapped, writeback=True):
        am.merge("fix")
    assert am.is_merged("fix")
    with torch.no_grad(), am.disable_adapters():  # disabling unmerges: the merged weights are back out
        bare = wrapped(**batch).last_hidden_state
    with torch.no_grad():
        got = wrapped(**batch).last_hidden_state
    torch.testing.assert_close(got, merged_plain, rtol=1e-4, atol=1e-5)
    assert (got - bare).abs().max() > 1e-4


def _lora() -> AdaptedModel:
    torch.manual_seed(0)
    am = AdaptedModel(tiny_model("bert", "base"))
    am.add_adapter("fix", "lora")
    perturb(am, "fix")
    return am.eval()


def _two_rank_worker(rank: int, out: str, port: int) -> None:
    """One rank of the two-process check (see the module docstring); writes rank<r>.json."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        report: dict = {}
        plain, am = _lora(), _lora()
        full = {k: v.detach().clone() for k, v in plain.adapter_state_dict("fix").items()}
        batch = tiny_batch(plain.model)
        with torch.no_grad():
            plain.merge("fix")
            want = plain(**batch).last_hidden_state
        wrapped = FSDP(am, device_id=torch.device("cpu"), use_orig_params=True)
        local = am.adapter_state_dict("fix")
        report["sharded"] = is_sharded(wrapped)
        report["local_numel"] = sum(v.numel() for v in local.values())
        report["full_numel"] = sum(v.numel() for v in full.values())
        try:
            check_full_weights(wrapped, "merge")
        except XlpeftValueError as e:
            report["merge_refused"] = str(e)[:60]
        try:  # the inner model holds 1-D views of its shard: AdaptedModel.merge refuses by itself
            am.merge("fix")
        except XlpeftValueError as e:
            report["inner_merge_refused"] = str(e)[:60]
        report["merged_after_refusal"] = am.is_merged("fix")
        with full_weights(wrapped):
            if rank == 0:
                am.save_adapter("fix", f"{out}/fix")
        with full_weights(wrapped, writeback=True):
            am.merge("fix")
        with torch.no_grad():
            got = wrapped(**batch).last_hidden_state
        report["merged_max_diff"] = float((got - want).abs().max())
        if rank == 0:
            saved = load_file(f"{out}/fix/adapter_model.safetensors")
            report["export_equal"] = saved.keys() == full.keys() and all(
                torch.equal(saved[k], full[k]) for k in saved)
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about a minute on two loaded cores
def test_two_rank_fsdp_export_gathers_and_merge_writes_back(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": f"{root.parent}{os.pathsep}{root}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, __file__, str(tmp_path), str(port)], cwd=str(root.parent), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"FSDP worker hung; its output ends:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["sharded"] and rank["merge_refused"].startswith("`merge` needs full weights")
        assert rank["inner_merge_refused"].startswith("`merge` needs full weights")
        assert not rank["merged_after_refusal"]
        assert rank["merged_max_diff"] < 1e-5, rank
    assert sum(r["local_numel"] for r in ranks) == ranks[0]["full_numel"], "each rank holds a part"
    assert ranks[0]["local_numel"] < ranks[0]["full_numel"], "rank 0 writes what it does not hold"
    assert ranks[0]["export_equal"], "rank 0 wrote the gathered (full) adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fix", "rank0.json", "rank1.json"]


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
