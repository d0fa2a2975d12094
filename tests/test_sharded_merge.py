"""``AdaptedModel.merge``/``unmerge`` refuse FSDP shards before changing anything (core check).

One CPU process (gloo, world size 1): FSDP1 with flat parameters
(``use_orig_params=False``) and FSDP2 (``fully_shard``, DTensor parameters).
Inside ``full_weights(writeback=True)`` the weights are full and merging works.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from torch import nn

from tiny import perturb, tiny_batch, tiny_model
from xlpeft import AdaptedModel
from xlpeft.core.sharding import is_sharded
from xlpeft.errors import XlpeftValueError
from xlpeft.lightning import sharded

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

REFUSED = r"`merge` needs full weights.*full_weights\(model, writeback=True\)` on every rank"


def _lora() -> AdaptedModel:
    torch.manual_seed(0)
    am = AdaptedModel(tiny_model("bert", "base"))
    am.add_adapter("fix", "lora")
    perturb(am, "fix")
    am.requires_grad_(False)  # FSDP1 flat parameters need one requires_grad
    return am.eval()


def _weights(am: AdaptedModel) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for m in am.modules() if isinstance(m, nn.Linear)]


def test_lightning_reuses_the_core_check():
    assert sharded.is_sharded is is_sharded
    assert not is_sharded(_lora())


def test_merge_on_fsdp1_flat_parameters_is_refused_before_any_change(group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    am = _lora()
    wrapped = FSDP(am, device_id=torch.device("cpu"), use_orig_params=False)
    assert is_sharded(am) and is_sharded(wrapped)
    before = _weights(am)
    with pytest.raises(XlpeftValueError, match=REFUSED):
        am.merge("fix")
    with pytest.raises(XlpeftValueError, match=REFUSED):
        am.merge_and_unload(["fix"])
    assert not am.is_merged("fix") and "fix" in am.configs
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(am), strict=True))


def test_merge_inside_full_weights_passes_the_check_and_reaches_the_flat_parameters(group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plain, am = _lora(), _lora()
    batch = tiny_batch(plain.model)
    with torch.no_grad():
        plain.merge("fix")
        want = plain(**batch).last_hidden_state
    wrapped = FSDP(am, device_id=torch.device("cpu"), use_orig_params=False)
    with sharded.full_weights(wrapped, writeback=True):
        assert not is_sharded(am)
        am.merge("fix")
    assert am.is_merged("fix")
    with pytest.raises(XlpeftValueError, match=r"`unmerge` needs full weights"):
        am.unmerge("fix")
    with pytest.raises(XlpeftValueError, match=r"`disable_adapters` needs full weights"):
        with am.disable_adapters():  # it would unmerge into the shards
            pass
    assert am.is_merged("fix")
    with torch.no_grad():
        got = wrapped(**batch).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with sharded.full_weights(wrapped, writeback=True):
        am.unmerge("fix")
    assert not am.is_merged("fix")


def test_merge_on_fsdp2_dtensors_is_refused_before_any_change(group):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    am = _lora()
    fully_shard(am)
    assert any(isinstance(p, DTensor) for p in am.parameters())
    before = [w.full_tensor() if isinstance(w, DTensor) else w for w in _weights(am)]
    with pytest.raises(XlpeftValueError, match=REFUSED):
        am.merge("fix")
    after = [w.full_tensor() if isinstance(w, DTensor) else w for w in _weights(am)]
    assert not am.is_merged("fix")
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
