"""Compacter: PHM weights, the shared rule, parameter count, identity start, files."""

from __future__ import annotations

import pytest
import torch

from tiny import tiny_batch, tiny_model
from xlpeft import AdaptedModel
from xlpeft.errors import XlpeftValueError
from xlpeft.methods import config_from_dict, preset
from xlpeft.methods.compacter import Compacter, CompacterConfig, PHMLinear, PHMRule

FAMILIES = [("bert", "masked-lm"), ("t5", "seq2seq")]


def _logits(model: AdaptedModel, batch: dict, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, **kw).logits


def _perturb(model: AdaptedModel, name: str, seed: int = 1) -> None:
    """Non-identity init: every adapter parameter (shared rule included) at random."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.adapter_modules(name):
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _phm_layers(model: AdaptedModel, name: str) -> list[PHMLinear]:
    return [m for mod in model.adapter_modules(name) for m in mod.modules() if isinstance(m, PHMLinear)]


@pytest.mark.parametrize("factorized", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_kronecker_weight_equals_explicit_dense(factorized: bool, shared: bool) -> None:
    torch.manual_seed(0)
    config = CompacterConfig(phm_dim=4, phm_rank=2, factorized_phm_w=factorized, shared_phm_rule=shared)
    rule = PHMRule(4, 1.0) if shared else None
    layer = PHMLinear(12, 8, config, rule)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    A = rule.rule if shared else layer.rule
    B = ([layer.left[i] @ layer.right[i].T for i in range(4)] if factorized
         else [layer.phm[i] for i in range(4)])
    dense = sum(torch.kron(A[i], B[i]) for i in range(4))
    assert dense.shape == (8, 12)
    torch.testing.assert_close(layer.weight(), dense)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x), x @ dense.T + layer.bias)


@pytest.mark.parametrize("family,head", FAMILIES)
def test_parameter_count_matches_formula(family: str, head: str) -> None:
    model = AdaptedModel(tiny_model(family, head))
    config = CompacterConfig()
    model.add_adapter("c", config)
    h, n, r = model.backbone.hidden, config.phm_dim, config.phm_rank
    k = config.width(h)
    places = sum(isinstance(m, Compacter) for mod in model.adapter_modules("c") for m in mod.modules())
    per_place = 2 * r * (h + k) + h + k        # s, t of down and up, plus both biases
    expected = places * per_place + n ** 3     # one shared rule
    report = model.parameter_report().adapters[0]
    assert report.parameters == expected
    assert sum(t.numel() for t in model.adapter_state_dict("c").values()) == expected
    # unshared rules: one n×n×n per PHM layer (two per place) instead of one in all
    model.add_adapter("u", config.replace(shared_phm_rule=False, phm_rank=2))
    per_place = 2 * 2 * (h + k) + h + k + 2 * n ** 3
    assert model.parameter_report().adapters[1].parameters == places * per_place


def test_width_is_a_multiple_of_n() -> None:
    assert CompacterConfig().width(768) == 24
    assert CompacterConfig().width(32) == 4            # rounded up to n, never 0
    assert CompacterConfig(phm_dim=8, reduction_factor=16).width(1000) == 56


def test_shared_rule_is_one_tensor_across_layers() -> None:
    model = AdaptedModel(tiny_model("t5", "seq2seq"))
    model.add_adapter("c", "compacter")
    rule = model.shared["c"]["compacter"].rule
    layers = _phm_layers(model, "c")
    assert len(layers) == 16                           # 8 places × (down, up), both stacks
    assert all(layer.rule_tensor() is rule for layer in layers)
    keys = [k for k in model.adapter_state_dict("c") if k.endswith("rule")]
    assert keys == ["shared.compacter.rule"]
    # every layer's gradient lands in that one tensor
    _perturb(model, "c")
    model.train_adapters("c")
    batch = tiny_batch(model.model)
    model(**batch, adapters="c").logits.pow(2).mean().backward()
    assert rule.grad is not None and rule.grad.abs().sum() > 0
    # changing it changes every layer's weight
    before = [layer.weight().detach().clone() for layer in layers]
    with torch.no_grad():
        rule.add_(1.0)
    assert all(not torch.equal(b, layer.weight()) for b, layer in zip(before, layers))


@pytest.mark.parametrize("family,head", FAMILIES)
def test_zero_init_is_base_and_non_identity_changes_outputs(family: str, head: str) -> None:
    model = AdaptedModel(tiny_model(family, head))
    batch = tiny_batch(model.model)
    base = _logits(model, batch)
    model.add_adapter("c", "compacter")
    torch.testing.assert_close(_logits(model, batch, adapters="c"), base, rtol=0, atol=0)
    with torch.no_grad():  # perturb only the zeroed factors: the rule and t were random already
        for layer in _phm_layers(model, "c"):
            layer.left.normal_()
        model.shared["c"]["compacter"].rule.normal_()
    out = _logits(model, batch, adapters="c")
    assert (out - base).abs().max() > 1e-3
    with model.disable_adapters():
        torch.testing.assert_close(_logits(model, batch), base, rtol=0, atol=0)


@pytest.mark.parametrize("family,head", FAMILIES)
def test_save_load_round_trip(family: str, head: str, tmp_path) -> None:
    model = AdaptedModel(tiny_model(family, head))
    model.add_adapter("c", CompacterConfig(placement=("ffn",), non_linearity="tanh"))
    _perturb(model, "c")
    batch = tiny_batch(model.model)
    expected = _logits(model, batch, adapters="c")
    model.save_adapter("c", tmp_path / "c")

    fresh = AdaptedModel(tiny_model(family, head))
    name = fresh.load_adapter(tmp_path / "c")
    assert fresh.configs[name] == model.configs["c"]
    torch.testing.assert_close(_logits(fresh, batch, adapters=name), expected)
    rule = fresh.shared[name]["compacter"].rule
    assert all(layer.rule_tensor() is rule for layer in _phm_layers(fresh, name))


def test_hidden_not_divisible_by_n_is_a_clear_error() -> None:
    model = AdaptedModel(tiny_model("bert"))
    with pytest.raises(XlpeftValueError, match=r"divisible by 5.*hidden size is 32.*2, 4, 8, 16, 32"):
        model.add_adapter("c", CompacterConfig(phm_dim=5))
    assert model.adapter_names == [] and len(model.points) == 0 and len(model.shared) == 0
    with pytest.raises(XlpeftValueError, match="divisible by 5"):  # unshared: raised in build
        model.add_adapter("c", CompacterConfig(phm_dim=5, shared_phm_rule=False))
    assert model.adapter_names == [] and len(model.points) == 0


def test_config_preset_checks_and_round_trip() -> None:
    assert preset("compacter") == CompacterConfig()
    config = CompacterConfig()
    assert (config.phm_dim, config.reduction_factor, config.placement) == (4, 32, ("attn", "ffn"))
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(XlpeftValueError, match="`placement` can be 'attn', 'ffn', 'cross'; got 'mlp'"):
        CompacterConfig(placement=("mlp",))
    with pytest.raises(XlpeftValueError, match="`phm_dim` must be > 0"):
        CompacterConfig(phm_dim=0)
    with pytest.raises(XlpeftValueError, match="`non_linearity` can be"):
        CompacterConfig(non_linearity="softmax")


def test_compacter_plus_plus_and_leave_out() -> None:
    model = AdaptedModel(tiny_model("bert"))
    model.add_adapter("c", CompacterConfig(placement=("ffn",), leave_out=(-1,)))
    keys = model.adapter_state_dict("c")
    assert {k.rsplit(".", 2)[0] for k in keys if not k.startswith("shared.")} == {"encoder.0.ffn"}
    assert [k for k in keys if k.startswith("shared.")] == ["shared.compacter.rule"]
