"""AdapterDrop (Rücklé et al. 2021): dropped blocks give the bare backbone's hidden states, bit for bit."""

from __future__ import annotations

import pytest
import torch
from tiny import perturb, run, tiny_batch, tiny_model

from xlpeft import AdaptedModel
from xlpeft.errors import XlpeftTypeError, XlpeftValueError
from xlpeft.methods import (
    AdapterDropConfig, BottleneckConfig, IA3Config, LoRAConfig, PrefixConfig, PromptConfig, adapter_drop,
    config_from_dict, preset,
)

TOL = 1e-5
DEEP = 4  # blocks in the backbone of these tests: drop 2, keep 2


def _backbone(family: str = "bert"):
    from tiny import tiny_config
    from transformers import AutoModel
    config = tiny_config(family)
    for key in ("num_hidden_layers", "num_layers", "encoder_layers", "decoder_layers", "num_decoder_layers"):
        if hasattr(config, key):
            setattr(config, key, DEEP)
    torch.manual_seed(0)
    return AutoModel.from_config(config).eval()


def _hidden(am: AdaptedModel, batch: dict, **kw) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return am(**batch, output_hidden_states=True, **kw).hidden_states  # embeddings, block 0, 1 …


@pytest.mark.parametrize("config", [
    BottleneckConfig(reduction_factor=4, placement=("attn", "ffn")),
    LoRAConfig(r=4, targets=("q", "v", "ffn_up")),
    IA3Config(),
    PrefixConfig(prefix_length=3),
    BottleneckConfig(reduction_factor=4, original_ln_before=True),   # post-norm placement
], ids=["houlsby", "lora", "ia3", "prefix", "seqbn"])
def test_dropped_in_training_and_inference_leaves_the_lowest_blocks_bare(config) -> None:
    am = AdaptedModel(_backbone())
    am.add_adapter("a", adapter_drop(config, 2), set_active=True)
    perturb(am, "a")
    batch = tiny_batch(am.model)
    with am.disable_adapters():
        bare = _hidden(am, batch)
    got = _hidden(am, batch)
    for i in range(3):  # embeddings and blocks 0, 1: bit-identical
        assert torch.equal(got[i], bare[i]), i
    assert (got[3] - bare[3]).abs().max() > 1e-3
    assert not any(k.startswith(("encoder-0-", "encoder-1-")) for k in am.points)  # no modules there


@pytest.mark.parametrize("config", [
    BottleneckConfig(reduction_factor=4, placement=("attn", "ffn")),
    LoRAConfig(r=4, targets=("q", "v", "ffn_up")),
    IA3Config(targets=("k", "v", "ffn_down")),  # ffn_down scales its input
], ids=["houlsby", "lora", "ia3"])
def test_dropped_at_inference_only(config) -> None:
    am = AdaptedModel(_backbone())
    am.add_adapter("a", adapter_drop(config, 2, train=False), set_active=True)
    perturb(am, "a")
    full = AdaptedModel(_backbone())
    full.add_adapter("a", config, set_active=True)
    tensors = {k.replace(".inner.", "."): v for k, v in am.adapter_state_dict("a").items()}
    full.load_adapter_state_dict("a", tensors)
    batch = tiny_batch(am.model)
    with am.disable_adapters():
        bare = _hidden(am, batch)
    am.eval()
    got = _hidden(am, batch)
    assert all(torch.equal(got[i], bare[i]) for i in range(3))
    assert (got[3] - bare[3]).abs().max() > 1e-3
    for m in am.adapter_modules("a"):  # training mode: every block acts, as the plain adapter
        m.train()
    trained = _hidden(am, batch)
    assert all((t - f).abs().max() <= TOL for t, f in zip(trained, _hidden(full, batch)))
    assert (trained[1] - bare[1]).abs().max() > 1e-3


def test_dropped_in_training_only_gets_no_gradient_there() -> None:
    am = AdaptedModel(_backbone())
    am.add_adapter("a", adapter_drop(LoRAConfig(r=4, targets=("q", "v")), 2, inference=False))
    perturb(am, "a")
    am.train_adapters("a")
    am.set_active("a")
    batch = tiny_batch(am.model)
    am(**batch).last_hidden_state.square().mean().backward()
    for key, point in am.adapter_places("a").items():
        grads = [p.grad for p in point.adapters["a"].parameters()]
        low = key.startswith(("encoder.0.", "encoder.1."))
        assert all((g is None) == low for g in grads), key
    am.eval()
    with am.disable_adapters():
        bare = _hidden(am, batch)
    assert (_hidden(am, batch)[1] - bare[1]).abs().max() > 1e-3  # at inference block 0 acts


def test_merge_folds_what_acts_at_inference() -> None:
    am = AdaptedModel(_backbone())
    am.add_adapter("a", adapter_drop(LoRAConfig(r=4, targets=("q", "v")), 2, train=False), set_active=True)
    perturb(am, "a")
    am.eval()
    batch = tiny_batch(am.model)
    query0 = am.model.encoder.layer[0].attention.self.query.weight.clone()
    unmerged = run(am, batch)
    am.merge("a")
    assert torch.equal(am.model.encoder.layer[0].attention.self.query.weight, query0)  # dropped: not folded
    assert (run(am, batch) - unmerged).abs().max() <= TOL
    am.unmerge("a")


def test_routing_and_files(tmp_path) -> None:
    config = adapter_drop(BottleneckConfig(reduction_factor=4), 2, train=False)
    am = AdaptedModel(_backbone())
    for i, name in enumerate(("a", "b")):
        am.add_adapter(name, config)
        perturb(am, name, seed=i)
    am.eval()
    batch = tiny_batch(am.model)
    plan = ["a", "b", "b", "a"]
    mixed = run(am, batch, adapters=plan)
    for name in ("a", "b"):
        am.set_active(name)
        rows = [i for i, n in enumerate(plan) if n == name]
        assert (mixed[rows] - run(am, batch)[rows]).abs().max() <= TOL
    am.save_adapter("a", str(tmp_path / "a"))
    fresh = AdaptedModel(_backbone())
    fresh.load_adapter(str(tmp_path / "a"), set_active=True)
    am.set_active("a")
    assert (run(fresh.eval(), batch) - run(am, batch)).abs().max() == 0
    assert fresh.configs["a"] == config and config_from_dict(config.to_dict()) == config


def test_parameter_counts_and_refusals() -> None:
    am = AdaptedModel(_backbone())
    am.add_adapter("full", "pfeiffer")
    am.add_adapter("left", adapter_drop(preset("pfeiffer"), 2))
    am.add_adapter("kept", adapter_drop(preset("pfeiffer"), 2, train=False))
    count = {n: sum(p.numel() for m in am.adapter_modules(n) for p in m.parameters()) for n in am.configs}
    assert count["left"] == count["full"] * (DEEP - 2) // DEEP and count["kept"] == count["full"]
    assert preset("pfeiffer-drop5").leave_out == (0, 1, 2, 3, 4)
    assert adapter_drop(preset("madx-language"), 3).parts[0].leave_out == (0, 1, 2)
    with pytest.raises(XlpeftValueError, match="'prompt' has no `leave_out`"):
        adapter_drop(PromptConfig(), 1)
    with pytest.raises(XlpeftValueError, match="can pass through linear and sublayer modules; 'prefix'"):
        adapter_drop(PrefixConfig(), 1, train=False)
    with pytest.raises(XlpeftValueError, match="cannot pass through post-norm"):
        adapter_drop(preset("pfeiffer-seqbn"), 1, train=False)
    with pytest.raises(XlpeftTypeError, match="one single-method config"):
        adapter_drop(preset("madx-language"), 1, train=False)
    with pytest.raises(XlpeftValueError, match="`layers` can be 0..4096"):
        adapter_drop(preset("lora"), -1)


def test_pickled_and_deep_copied_wrappers_keep_working() -> None:
    import copy
    import pickle
    am = AdaptedModel(_backbone())
    am.add_adapter("a", adapter_drop(LoRAConfig(r=4, targets=("q", "v")), 2, train=False), set_active=True)
    perturb(am, "a")
    am.eval()
    batch = tiny_batch(am.model)
    expected = run(am, batch)
    for twin in (pickle.loads(pickle.dumps(am)), copy.deepcopy(am)):
        assert torch.equal(run(twin, batch), expected)
        twin.merge("a")
        assert (run(twin, batch) - expected).abs().max() <= TOL
