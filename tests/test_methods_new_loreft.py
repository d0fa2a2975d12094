"""LoReFT (Wu et al. 2024): the intervention by hand, positions, families, routing, files, merge refusal."""

from __future__ import annotations

import pytest
import torch
from tiny import HIDDEN, LAYERS, perturb, run, tiny_batch, tiny_model

from xlpeft import AdaptedModel
from xlpeft.errors import XlpeftValueError
from xlpeft.methods import LoReFTConfig, preset

TOL = 1e-5


def _adapted(config: LoReFTConfig, names=("a",), family: str = "bert", head: str = "base") -> AdaptedModel:
    am = AdaptedModel(tiny_model(family, head))
    for i, name in enumerate(names):
        am.add_adapter(name, config)
        perturb(am, name, scale=0.3, seed=i)
    return am


def test_last_block_output_equals_the_formula_at_the_chosen_positions_only() -> None:
    config = LoReFTConfig(r=2, prefix_positions=2, suffix_positions=1, leave_out=tuple(range(LAYERS - 1)))
    am = _adapted(config)
    am.set_active("a")
    batch = tiny_batch(am.model)
    with am.disable_adapters():
        h = run(am, batch)  # the last block's output = last_hidden_state (BERT: no final norm)
    got = run(am, batch)
    module = am.points[f"encoder-{LAYERS - 1}-block"].adapters["a"]
    expected = h.clone()
    for unit, cols in ((module.units[0], slice(0, 2)), (module.units[1], slice(-1, None))):
        rot = unit.basis()
        assert torch.allclose(rot @ rot.t(), torch.eye(2), atol=1e-5)  # orthonormal rows
        x = h[:, cols]
        expected[:, cols] = x + (x @ unit.source.weight.t() + unit.source.bias - x @ rot.t()) @ rot
    assert (got - expected).abs().max() <= TOL
    assert torch.equal(got[:, 2:-1], h[:, 2:-1])  # other positions: bit-identical
    assert (got[:, :2] - h[:, :2]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["bert", "xlm-roberta", "t5", "mbart"])
def test_every_family_gets_an_intervention_per_block(family: str) -> None:
    am = AdaptedModel(tiny_model(family))
    batch = tiny_batch(am.model)
    bare = run(am, batch)
    am.add_adapter("id", LoReFTConfig(init_identity=True), set_active=True)
    assert torch.allclose(run(am, batch), bare, atol=1e-5)  # W = R, b = 0: the identity
    am.add_adapter("a", LoReFTConfig(r=2))
    perturb(am, "a")
    am.set_active("a")
    assert (run(am, batch) - bare).abs().max() > 1e-2
    blocks = sum(am.backbone.num_layers().values())
    assert sum(k.endswith("-block") for k in am.points) == blocks


def test_mixed_batch_equals_each_adapter_alone() -> None:
    am = _adapted(LoReFTConfig(r=2, suffix_positions=2), ("a", "b"), head="masked-lm")
    batch = tiny_batch(am.model)
    plan = ["b", "a", "a", "b"]
    mixed = run(am, batch, adapters=plan)
    for name in ("a", "b"):
        am.set_active(name)
        rows = [i for i, n in enumerate(plan) if n == name]
        assert (mixed[rows] - run(am, batch)[rows]).abs().max() <= TOL
    assert (run(am, batch, adapters=["a"] * 4) - run(am, batch, adapters=["b"] * 4)).abs().max() > 1e-3


def test_merge_is_refused_and_nothing_changes() -> None:
    am = _adapted(LoReFTConfig())
    am.set_active("a")
    before = {k: v.clone() for k, v in am.state_dict().items()}
    with pytest.raises(XlpeftValueError, match=r"adapter 'a' \(loreft\) cannot be merged"):
        am.merge("a")
    assert all(torch.equal(v, am.state_dict()[k]) for k, v in before.items())


def test_save_load_round_trip_and_gradients(tmp_path) -> None:
    config = LoReFTConfig(r=2, suffix_positions=1, non_linearity="tanh")
    am = _adapted(config, head="masked-lm")
    am.set_active("a")
    batch = tiny_batch(am.model)
    expected = run(am, batch)
    am.save_adapter("a", str(tmp_path / "a"))
    fresh = AdaptedModel(tiny_model("bert", "masked-lm"))
    fresh.load_adapter(str(tmp_path / "a"), set_active=True)
    assert (run(fresh, batch) - expected).abs().max() == 0 and fresh.configs["a"] == config
    am.train_adapters("a")
    am(**batch)["logits"].square().mean().backward()
    params = [p for m in am.adapter_modules("a") for p in m.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in am.model.parameters())


@pytest.mark.parametrize("tied, prefix, suffix, units", [(False, 3, 0, 1), (False, 2, 2, 2), (True, 2, 2, 1)])
def test_parameter_count_follows_the_formula(tied: bool, prefix: int, suffix: int, units: int) -> None:
    am = AdaptedModel(tiny_model("bert"))
    am.add_adapter("a", LoReFTConfig(r=4, prefix_positions=prefix, suffix_positions=suffix, tied_weights=tied))
    count = sum(p.numel() for m in am.adapter_modules("a") for p in m.parameters())
    assert count == LAYERS * units * (2 * 4 * HIDDEN + 4)  # per unit: R (r·d) + W (r·d) + b (r)


def test_config_checks_and_preset() -> None:
    with pytest.raises(XlpeftValueError, match="`prefix_positions` \\+ `suffix_positions` can be ≥ 1"):
        LoReFTConfig(prefix_positions=0)
    with pytest.raises(XlpeftValueError, match="`r` must be > 0"):
        LoReFTConfig(r=0)
    am = AdaptedModel(tiny_model("bert"))
    with pytest.raises(XlpeftValueError, match=f"`r` can be 1..{HIDDEN}"):
        am.add_adapter("a", LoReFTConfig(r=HIDDEN + 1))
    assert "a" not in am.configs and not am.points
    assert preset("loreft") == LoReFTConfig(r=1, prefix_positions=3)


def test_gradients_with_activation_checkpointing_equal_the_plain_ones() -> None:
    grads = []
    for checkpointing in (False, True):
        am = _adapted(LoReFTConfig(r=2, suffix_positions=1), head="masked-lm")
        am.train_adapters("a")
        am.set_active("a")
        am.train()
        if checkpointing:
            am.activation_checkpointing_enable()
        am(**tiny_batch(am.model))["logits"].square().mean().backward()
        grads.append([p.grad.clone() for m in am.adapter_modules("a") for p in m.parameters()])
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(*grads))
