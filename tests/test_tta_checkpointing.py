"""TestTimeAdaptation(checkpointing=True): the same EMEA/TENT steps with activation checkpointing.

Checkpointing is exact: the ensemble weights after the steps, the predictions and
the entropy log equal those of the run without it; the blocks are checkpointed only
during the steps (modes and the model's checkpointing flag are put back), and the
recomputed blocks keep their routing (``RoutedCheckpoint``).
"""

from __future__ import annotations

import pytest
import torch

from test_tta import make, batch, setup  # noqa: F401  (the module-scoped fixture)
from xlpeft.lightning.tta import TestTimeAdaptation


@pytest.mark.parametrize("method", ["emea", "tent"])
def test_checkpointed_steps_equal_plain_steps(setup, method) -> None:  # noqa: F811
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same fresh weights (head, task adapter) in both runs
        module = make(setup)
        b = batch(setup)
        cb = TestTimeAdaptation(method=method, steps=3, lr=0.1, candidates=["eng", "swh", "tgl"],
                                checkpointing=checkpointing, tent_params=("layernorm", "adapters"))
        cb.setup(None, module, "test")
        modes = [m.training for m in module.modules()]
        with torch.inference_mode():
            cb.adapt(module, b)
            logits = module(b)
        assert [m.training for m in module.modules()] == modes
        assert not module.adapted.model.is_activation_checkpointing
        runs.append((logits, cb.layer_weights(), cb.entropy_log[-1][1:]))
        cb.restore(module)
    (a, wa, ea), (b_, wb, eb) = runs
    torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)
    if method == "emea":
        torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(wa, torch.full_like(wa, 1 / 3))  # the steps moved the weights
    assert ea == pytest.approx(eb, rel=1e-5)


def test_checkpointing_really_checkpoints(setup, monkeypatch) -> None:  # noqa: F811
    """The blocks' checkpoint function runs during the steps (and not otherwise)."""
    from xlpeft.core.routing import RoutedCheckpoint
    calls = []
    original = RoutedCheckpoint.__call__

    def spy(self, fn, *args, **kwargs):
        calls.append(self.stack)
        return original(self, fn, *args, **kwargs)
    monkeypatch.setattr(RoutedCheckpoint, "__call__", spy)
    module = make(setup)
    cb = TestTimeAdaptation(method="emea", steps=2, candidates=["eng", "swh", "tgl"], checkpointing=True)
    cb.setup(None, module, "test")
    with torch.inference_mode():
        cb.adapt(module, batch(setup))
    assert calls
    count = len(calls)
    with torch.no_grad():
        module(batch(setup))
    assert len(calls) == count
