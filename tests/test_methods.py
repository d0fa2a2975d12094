"""Method modules and configs on their own (bottleneck, invertible, LoRA,
(IA)3, BitFit), plus where the invertible adapter sits in a masked-LM model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import ENCODER_FAMILIES, tiny_batch, tiny_model
from torch import nn

from xlpeft import AdaptedModel, Stack
from xlpeft.methods import (
    PRESETS, BitFitConfig, BottleneckConfig, ConfigUnion, IA3Config, InvertibleConfig, LoRAConfig,
    config_from_dict, preset,
)
from xlpeft.methods.base import Dims, Site
from xlpeft.methods.bitfit import BiasDelta
from xlpeft.methods.bottleneck import Bottleneck
from xlpeft.methods.ia3 import IA3
from xlpeft.methods.invertible import NICECoupling
from xlpeft.methods.lora import LoRA

AVAILABLE = ["pfeiffer", "houlsby", "parallel", "lora", "ia3", "bitfit", "madx-language"]


@torch.no_grad()
def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return module


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name", AVAILABLE)
def test_preset_round_trips_through_dict(name: str) -> None:
    config = preset(name)
    assert config_from_dict(config.to_dict()) == config
    assert name in PRESETS


def test_presets_mean_what_papers_say() -> None:
    assert preset("pfeiffer") == BottleneckConfig(reduction_factor=16, placement=("ffn",))
    assert preset("houlsby").placement == ("attn", "ffn")
    assert preset("parallel").mode == "parallel" and preset("parallel").scaling == 4.0
    madx = preset("madx-language")
    assert isinstance(madx, ConfigUnion)
    assert [c.method for c in madx.parts] == ["bottleneck", "invertible"]
    assert madx.parts[0].reduction_factor == 2


def test_replace_keeps_frozen_copy() -> None:
    config = LoRAConfig(r=4)
    changed = config.replace(r=8, targets=("q", "k"))
    assert (config.r, changed.r, changed.targets) == (4, 8, ("q", "k"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 2  # type: ignore[misc]


# ---------------------------------------------------------------- bottleneck


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_bottleneck_formula(mode: str) -> None:
    config = BottleneckConfig(reduction_factor=4, mode=mode, scaling=2.5, non_linearity="tanh")
    module = config.build(Site("sublayer", "ffn"), Dims(16))
    assert isinstance(module, Bottleneck) and module.down.out_features == 4
    x, h = torch.randn(3, 16), torch.randn(3, 16)
    torch.testing.assert_close(module(x, h), h)  # zero up-projection: identity
    randomise(module)
    source = x if mode == "parallel" else h
    manual = h + 2.5 * module.up(torch.tanh(module.down(source)))
    torch.testing.assert_close(module(x, h), manual)
    assert module.needs_input == (mode == "parallel")


def test_gated_bottleneck_multiplies_by_gate() -> None:
    module = randomise(BottleneckConfig(reduction_factor=4, gated=True).build(Site("sublayer", "ffn"), Dims(8)))
    h = torch.randn(2, 8)
    delta = module.up(torch.relu(module.down(h)))
    torch.testing.assert_close(module(None, h), h + delta * torch.sigmoid(module.gate(h)))


# ---------------------------------------------------------------- invertible


@pytest.mark.parametrize("hidden", [8, 9])
def test_invertible_inverse_undoes_forward(hidden: int) -> None:
    coupling = NICECoupling(hidden, InvertibleConfig(init_zero=False, non_linearity="gelu"))
    randomise(coupling)
    x = torch.randn(4, 5, hidden)
    y = coupling(x)
    assert (y - x).abs().max() > 1e-2
    torch.testing.assert_close(coupling.inverse(y), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(coupling(coupling.inverse(x)), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_invertible_sits_after_embeddings_and_before_lm_projection(family: str) -> None:
    model = tiny_model(family, "masked-lm")
    embeddings = model.base_model.embeddings
    projection = model.get_output_embeddings()  # the (tied) output projection
    seen: dict[str, torch.Tensor] = {}
    embeddings.register_forward_hook(lambda m, a, out: seen.__setitem__("embed_raw", out))
    am = AdaptedModel(model)
    am.add_adapter("lang", "madx-language", set_active=True)
    # probes around the adapter's own hooks: ``prepend`` runs before them, the others after
    embeddings.register_forward_hook(lambda m, a, out: seen.__setitem__("embed", out))
    projection.register_forward_pre_hook(lambda m, a: seen.__setitem__("head_raw", a[0]), prepend=True)
    projection.register_forward_pre_hook(lambda m, a: seen.__setitem__("head", a[0]))
    coupling = am.shared["lang"]["invertible"]
    randomise(coupling, seed=3)
    assert set(am.points) >= {"encoder-embed", "lm_output"}
    with torch.no_grad():
        am(**tiny_batch(model, batch=2))
    torch.testing.assert_close(seen["embed"], coupling(seen["embed_raw"]))
    assert (seen["head"] - seen["head_raw"]).abs().max() > 1e-3
    torch.testing.assert_close(seen["head"], coupling.inverse(seen["head_raw"]))
    with torch.no_grad(), am.disable_adapters():
        am(**tiny_batch(model, batch=2))
    torch.testing.assert_close(seen["head"], seen["head_raw"], rtol=0, atol=0)


def test_stacked_invertibles_invert_in_reverse_order() -> None:
    model = tiny_model("bert", "masked-lm")
    projection = model.get_output_embeddings()
    am = AdaptedModel(model)
    for name in ("x", "y"):
        am.add_adapter(name, InvertibleConfig(init_zero=False))
        randomise(am.shared[name]["invertible"], seed=len(name) + ord(name))
    seen: dict[str, torch.Tensor] = {}
    projection.register_forward_pre_hook(lambda m, a: seen.__setitem__("raw", a[0]), prepend=True)
    projection.register_forward_pre_hook(lambda m, a: seen.__setitem__("head", a[0]))
    with torch.no_grad():
        am(**tiny_batch(model, batch=2), adapters=Stack("x", "y"))
    fx, fy = am.shared["x"]["invertible"], am.shared["y"]["invertible"]
    torch.testing.assert_close(seen["head"], fx.inverse(fy.inverse(seen["raw"])), rtol=1e-5, atol=1e-5)
    assert (seen["head"] - fy.inverse(fx.inverse(seen["raw"]))).abs().max() > 1e-4


def test_invertible_on_seq2seq_inverts_at_the_decoder_head() -> None:
    am = AdaptedModel(tiny_model("mbart", "seq2seq"))
    am.add_adapter("enc", InvertibleConfig())
    assert {k for k, p in am.points.items() if "enc" in p.adapters} == {"encoder-embed"}
    am.add_adapter("both", InvertibleConfig(stacks=("encoder", "decoder")))
    assert {k for k, p in am.points.items() if "both" in p.adapters} == {
        "encoder-embed", "decoder-embed", "lm_output"}
    assert am.points["lm_output"].stacks == ("decoder",)


# ---------------------------------------------------------------- linear methods


def _linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(6, 5, bias=bias)


def test_lora_forward_matches_delta_weight_and_merge() -> None:
    linear = _linear()
    lora = randomise(LoRA(6, 5, LoRAConfig(r=3, alpha=6)))
    x = torch.randn(4, 6)
    y = linear(x)
    torch.testing.assert_close(lora(x, y), y + x @ lora.delta_weight().T)
    assert lora.scaling == 2.0
    weight = linear.weight.detach().clone()
    lora.merge(linear)
    torch.testing.assert_close(linear(x), lora(x, y))
    lora.unmerge(linear)
    torch.testing.assert_close(linear.weight, weight, rtol=0, atol=1e-7)
    assert not LoRA(6, 5, LoRAConfig(gated=True)).mergeable


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_merge_scales_rows_or_columns(on_input: bool) -> None:
    linear = _linear()
    ia3 = IA3(6 if on_input else 5, on_input, init_ones=False)
    x = torch.randn(4, 6)
    expected = linear(ia3.transform_input(x)) if on_input else ia3(x, linear(x))
    assert not torch.allclose(expected, linear(x))
    state = {k: v.clone() for k, v in linear.state_dict().items()}
    ia3.merge(linear)
    torch.testing.assert_close(linear(x), expected)
    ia3.unmerge(linear)
    for k, v in state.items():
        torch.testing.assert_close(linear.state_dict()[k], v, rtol=1e-6, atol=1e-7)


def test_bitfit_merges_into_a_bias_free_linear() -> None:
    linear = _linear(bias=False)
    delta = randomise(BiasDelta(5))
    x = torch.randn(4, 6)
    expected = delta(x, linear(x))
    delta.merge(linear)
    torch.testing.assert_close(linear(x), expected)
    delta.unmerge(linear)
    torch.testing.assert_close(linear(x), x @ linear.weight.T)


@pytest.mark.parametrize("config", [LoRAConfig(r=4), IA3Config(), BitFitConfig()], ids=["lora", "ia3", "bitfit"])
def test_linear_methods_start_as_identity(config) -> None:
    for site in config.sites():
        module = config.build(site, Dims(6, 6, 5))
        x, y = torch.randn(2, 6), torch.randn(2, 5)
        if getattr(module, "has_input_transform", False):
            torch.testing.assert_close(module.transform_input(x), x)
        torch.testing.assert_close(module(x, y), y)
