"""AdaMix (Wang et al. 2022): stochastic experts in training, averaged experts at inference.

Golden values: at inference each kind equals the plain adapter (xlpeft's
``BottleneckConfig`` / ``LoRAConfig``) holding the averaged expert weights; in
training it equals the one expert pair the seeded draw picks.
"""

from __future__ import annotations

import pytest
import torch
from tiny import HIDDEN, LAYERS, perturb, run, tiny_batch, tiny_model

from xlpeft import AdaptedModel
from xlpeft.errors import XlpeftValueError
from xlpeft.methods import AdaMixConfig, BottleneckConfig, LoRAConfig, preset
from xlpeft.methods.adamix import consistency_loss

BOTTLENECK = AdaMixConfig(num_experts=3, reduction_factor=4, non_linearity="gelu")
LORA = AdaMixConfig(kind="lora", num_experts=3, r=4, alpha=8, targets=("q", "v"))
TOL = 1e-5


def _adapted(config: AdaMixConfig, names=("a",)) -> AdaptedModel:
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    for i, name in enumerate(names):
        am.add_adapter(name, config)
        perturb(am, name, seed=i)
    return am.eval()


def _plain(config: AdaMixConfig, am: AdaptedModel) -> AdaptedModel:
    """A plain bottleneck / LoRA adapter holding AdaMix's averaged experts."""
    plain = AdaptedModel(tiny_model("bert", "masked-lm"))
    if config.kind == "lora":
        plain.add_adapter("p", LoRAConfig(r=config.r, alpha=config.alpha, targets=config.targets), set_active=True)
        names = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}
    else:
        plain.add_adapter("p", BottleneckConfig(reduction_factor=config.reduction_factor,
                                                non_linearity=config.non_linearity), set_active=True)
        names = {"down.weight": "down_weight", "down.bias": "down_bias", "up.weight": "up_weight",
                 "up.bias": "up_bias"}
    ours = am.adapter_state_dict("a")
    tensors = {}
    for key in plain.adapter_state_dict("p"):
        place, param = key[:key.rindex(".", 0, key.rindex("."))], key[key.rindex(".", 0, key.rindex(".")) + 1:]
        tensors[key] = ours[f"{place}.{names[param]}"].mean(0)
    plain.load_adapter_state_dict("p", tensors)
    return plain.eval()


@pytest.mark.parametrize("config", [BOTTLENECK, LORA], ids=["bottleneck", "lora"])
def test_inference_equals_the_plain_adapter_with_averaged_experts(config: AdaMixConfig) -> None:
    am = _adapted(config)
    am.set_active("a")
    batch = tiny_batch(am.model)
    with am.disable_adapters():
        assert (run(am, batch) - run(_plain(config, am), batch)).abs().max() > 1e-2
    assert (run(am, batch) - run(_plain(config, am), batch)).abs().max() <= TOL


@pytest.mark.parametrize("config", [BOTTLENECK, LORA], ids=["bottleneck", "lora"])
def test_training_picks_one_expert_pair_at_random(config: AdaMixConfig) -> None:
    am = _adapted(config)
    module = next(iter(am.adapter_modules("a"))).train()
    x, h = torch.randn(2, 5, HIDDEN), torch.randn(2, 5, HIDDEN)
    torch.manual_seed(4)
    i, j = int(torch.randint(3, ())), int(torch.randint(3, ()))  # the draws the forward makes, in order
    torch.manual_seed(4)
    got = module(x, h)
    if config.kind == "lora":
        expected = h + 2.0 * x @ module.lora_A[i].t() @ module.lora_B[j].t()
    else:
        down = torch.nn.functional.gelu(h @ module.down_weight[i].t() + module.down_bias[i])
        expected = h + down @ module.up_weight[j].t() + module.up_bias[j]
    assert (got - expected).abs().max() <= TOL
    draws = []
    for seed in range(8):
        torch.manual_seed(seed)
        draws.append(module(x, h))
    assert any((d - draws[0]).abs().max() > 1e-3 for d in draws)  # stochastic routing
    module.eval()
    assert torch.equal(module(x, h), module(x, h))  # inference: the average, deterministic


def test_lora_kind_merges_its_inference_form() -> None:
    am = _adapted(LORA)
    am.set_active("a")
    batch = tiny_batch(am.model)
    unmerged = run(am, batch)
    am.merge("a")
    assert (run(am, batch) - unmerged).abs().max() <= TOL
    am.unmerge("a")


def test_bottleneck_kind_refuses_merge_and_routes_per_example() -> None:
    am = _adapted(BOTTLENECK, ("a", "b"))
    with pytest.raises(XlpeftValueError, match=r"adapter 'a' \(adamix\) cannot be merged"):
        am.merge("a")
    batch = tiny_batch(am.model)
    plan = ["a", "b", "a", "b"]
    mixed = run(am, batch, adapters=plan)
    for name in ("a", "b"):
        am.set_active(name)
        rows = [i for i, n in enumerate(plan) if n == name]
        assert (mixed[rows] - run(am, batch)[rows]).abs().max() <= TOL


def test_save_load_round_trip(tmp_path) -> None:
    am = _adapted(BOTTLENECK)
    am.set_active("a")
    batch = tiny_batch(am.model)
    expected = run(am, batch)
    am.save_adapter("a", str(tmp_path / "a"))
    fresh = AdaptedModel(tiny_model("bert", "masked-lm"))
    fresh.load_adapter(str(tmp_path / "a"), set_active=True)
    assert (run(fresh.eval(), batch) - expected).abs().max() == 0 and fresh.configs["a"] == BOTTLENECK


def test_parameter_count_and_presets() -> None:
    am = _adapted(BOTTLENECK)
    width = HIDDEN // 4
    count = sum(p.numel() for m in am.adapter_modules("a") for p in m.parameters())
    assert count == LAYERS * 3 * (2 * HIDDEN * width + width + HIDDEN)  # E × one bottleneck
    assert preset("adamix").kind == "bottleneck" and preset("adamix").num_experts == 4
    assert preset("adamix-lora").kind == "lora"
    with pytest.raises(XlpeftValueError, match="`kind` can be 'bottleneck', 'lora'"):
        AdaMixConfig(kind="moe")
    with pytest.raises(XlpeftValueError, match="`num_experts` can be 1..64"):
        AdaMixConfig(num_experts=0)


def test_consistency_loss() -> None:
    a, b = torch.randn(4, 7), torch.randn(4, 7)
    assert consistency_loss(a, a).abs() < 1e-6
    assert consistency_loss(a, b) > 0 and torch.isclose(consistency_loss(a, b), consistency_loss(b, a))
