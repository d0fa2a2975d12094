"""Sharded (FSDP) models: detection, refusal of merges on shards, adapter export of full weights.

CPU: one process (gloo, world size 1) wraps an ``AdaptedModel`` in FSDP1 (explicit
``device_id=cpu``): parameters become flat-parameter views, so the gather/export
path is that of a real run, without a second rank. FSDP2 (``fully_shard``, DTensor)
is detected and refused.
GPU (skipped without CUDA): a Lightning ``FSDPStrategy`` run trains adapters and
writes adapter-only files and checkpoints (Lightning refuses FSDPStrategy on CPU).
"""

from __future__ import annotations

import socket

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


@pytest.fixture
def group(monkeypatch):
    """A one-process gloo group (FSDP needs one); the environment is put back after."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


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
