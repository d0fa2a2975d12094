"""Composition blocks: Stack, Fuse, Average and BatchSplit, as data and in the
forward. Point-level checks capture a sublayer's output with hooks around the
adapter point and recompute the algebra by hand from the adapter modules.
"""

from __future__ import annotations

import pytest
import torch
from tiny import main_output as main, run, perturb, tiny_batch, tiny_model

from xlpeft import AdaptedModel, Average, BatchSplit, Fuse, Stack
from xlpeft.core.composition import fusions, leaves, validate
from xlpeft.errors import XlpeftKeyError, XlpeftTypeError, XlpeftValueError
from xlpeft.methods import BitFitConfig, BottleneckConfig, IA3Config, LoRAConfig
from xlpeft.methods.fusion import Fusion
from xlpeft.core.points import LinearPoint, SublayerPoint


def model_with(family: str, head: str, **configs) -> AdaptedModel:
    am = AdaptedModel(tiny_model(family, head))
    for i, (name, config) in enumerate(configs.items()):
        am.add_adapter(name, config)
        perturb(am, name, seed=i)
    return am


# ---------------------------------------------------------------- blocks as data


def test_blocks_are_values() -> None:
    assert Stack("a", "b") == Stack(["a", "b"]) and hash(Stack("a", "b")) == hash(Stack(("a", "b")))
    assert Stack("a", "b") != Stack("b", "a") and Stack("a", "b") != Fuse("a", "b")
    assert Average("a", "b", weights=[1, 3]).weights == (0.25, 0.75)
    assert Average("a", "b") != Average("a", "b", weights=[1, 3])
    assert Average("a", "b").weights == (0.5, 0.5)
    assert Fuse("x", "y", "z").key == "x+y+z"
    assert repr(Stack("a", Fuse("b", "c"))) == "Stack('a', Fuse('b', 'c'))"
    split = BatchSplit("a", Stack("b", "c"), batch_sizes=[2, 1])
    assert split.per_example() == ["a", "a", Stack("b", "c")]
    assert BatchSplit("a", "b", batch_sizes=[0, 2]).per_example() == ["b", "b"]


def test_validate_leaves_and_fusions() -> None:
    setup = Stack("lang", Fuse("t1", "t2"), Average("t3", "lang"))
    validate(setup, ["lang", "t1", "t2", "t3"])
    validate(BatchSplit("a", Stack("a", Fuse("a", "b")), batch_sizes=[1, 1]), ["a", "b"])
    assert leaves(setup) == ["lang", "t1", "t2", "t3"]
    assert leaves(None) == [] and leaves("x") == ["x"]
    assert fusions(setup) == [Fuse("t1", "t2")] and fusions("x") == []


# ---------------------------------------------------------------- Stack and Average at a point


def test_stack_and_average_algebra_at_a_sublayer_point() -> None:
    model = tiny_model("bert", "masked-lm")
    before: list = []
    ffn_out = model.base_model.encoder.layer[0].output.dense
    ffn_out.register_forward_hook(lambda m, a, out: before.append(out.detach().clone()))  # runs first
    am = AdaptedModel(model)
    for i, name in enumerate(("a", "b")):
        am.add_adapter(name, "pfeiffer")
        perturb(am, name, seed=i)
    after: list = []
    ffn_out.register_forward_hook(lambda m, a, out: after.append(out.detach().clone()))  # runs last
    point = am.points["encoder-0-ffn"]
    pa, pb = point.adapters["a"], point.adapters["b"]
    batch = tiny_batch(model, batch=2)
    with torch.no_grad():
        cases = {
            Stack("a", "b"): lambda h: pb(None, pa(None, h)),
            Stack("b", "a"): lambda h: pa(None, pb(None, h)),
            Average("a", "b", weights=[0.3, 0.7]): lambda h: 0.3 * pa(None, h) + 0.7 * pb(None, h),
            Average("a", "b", weights=[2, 0]): lambda h: pa(None, h),
        }
        for setup, manual in cases.items():
            before.clear(), after.clear()
            am(**batch, adapters=setup)
            torch.testing.assert_close(after[0], manual(before[0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(am, batch, adapters=Average("a", "b", weights=[1, 0])),
                               run(am, batch, adapters="a"), rtol=1e-5, atol=1e-6)
    assert (run(am, batch, adapters=Stack("a", "b")) - run(am, batch, adapters=Stack("b", "a"))).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["bert", "mt5", "m2m_100"])
def test_ia3_and_bitfit_average_is_the_averaged_adapter(family: str) -> None:
    """Scales average to the weighted mean scale; bias deltas to the weighted mean bias."""
    head = "masked-lm" if family == "bert" else "seq2seq"
    ia3 = IA3Config(targets=("k", "v", "ffn_down"), input_scaled=("ffn_down",))
    am = model_with(family, head, i1=ia3, i2=ia3, b1=BitFitConfig(), b2=BitFitConfig())
    batch = tiny_batch(am.model, batch=2)
    w = [0.3, 0.7]
    for kind in ("i", "b"):
        first, second, mix = f"{kind}1", f"{kind}2", f"{kind}mix"
        am.add_adapter(mix, am.configs[first])
        s1, s2 = am.adapter_state_dict(first), am.adapter_state_dict(second)
        am.load_adapter_state_dict(mix, {k: w[0] * s1[k] + w[1] * s2[k] for k in s1})
        averaged = run(am, batch, adapters=Average(first, second, weights=w))
        torch.testing.assert_close(averaged, run(am, batch, adapters=mix), rtol=1e-5, atol=1e-5)
        assert (averaged - run(am, batch, adapters=first)).abs().max() > 1e-3


def test_ia3_average_scales_the_linear_input_and_output() -> None:
    model = tiny_model("bert")
    block = model.base_model.encoder.layer[0]
    seen: dict = {}
    block.output.dense.register_forward_pre_hook(lambda m, a: seen.__setitem__("x_raw", a[0].clone()))
    ia3 = IA3Config(targets=("k", "ffn_down"), input_scaled=("ffn_down",))
    am = AdaptedModel(model)
    for i, name in enumerate(("i1", "i2")):
        am.add_adapter(name, ia3)
        perturb(am, name, seed=i)
    # linear adapters act inside the linear: their output hook goes first, so probe with prepend
    block.attention.self.key.register_forward_hook(lambda m, a, y: seen.__setitem__("k_raw", y.clone()),
                                                   prepend=True)
    block.attention.self.key.register_forward_hook(lambda m, a, y: seen.__setitem__("k", y.clone()))
    block.output.dense.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))
    key, down = am.points["encoder-0-attention-self-key"], am.points["encoder-0-output-dense"]
    assert isinstance(key, LinearPoint) and isinstance(down, LinearPoint)
    with torch.no_grad():
        am(**tiny_batch(model, batch=2), adapters=Average("i1", "i2", weights=[0.25, 0.75]))
    for point, raw, new in ((key, "k_raw", "k"), (down, "x_raw", "x")):
        scale = 0.25 * point.adapters["i1"].ia3_l + 0.75 * point.adapters["i2"].ia3_l
        torch.testing.assert_close(seen[new], seen[raw] * scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "mbart", "t5"])
def test_linear_adapters_act_inside_the_linear_whatever_the_add_order(family: str) -> None:
    """A bottleneck on a sublayer whose output linear also has LoRA/BitFit sees the adapted linear;
    a parallel one reads the sublayer input before (IA)3 scales it for the first FFN linear."""
    configs = {"bn": BottleneckConfig(reduction_factor=4, placement=("attn", "ffn")),
               "pa": BottleneckConfig(reduction_factor=4, mode="parallel"),
               "ia": IA3Config(targets=("ffn_up",), input_scaled=("ffn_up",)),
               "lo": LoRAConfig(r=2, targets=("o", "ffn_down")), "bf": BitFitConfig(targets=("o", "ffn_down"))}
    outs, states = [], {}
    for order in (("bn", "pa", "lo", "bf", "ia"), ("ia", "bf", "lo", "pa", "bn")):
        am = AdaptedModel(tiny_model(family))
        for name in order:
            am.add_adapter(name, configs[name])
            if name in states:
                am.load_adapter_state_dict(name, states[name])
            else:
                perturb(am, name, seed=len(states))
                states[name] = am.adapter_state_dict(name)
        outs.append(run(am, tiny_batch(am.model, batch=2), adapters=Stack("lo", "bf", "ia", "bn", "pa")))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_fuse_of_linear_adapters_runs_them_in_order() -> None:
    """Fusion mixes sublayer outputs; LoRA-style adapters inside a Fuse are stacked."""
    lora = LoRAConfig(r=2, targets=("q", "v"))
    am = model_with("bert", "base", l1=lora, l2=lora)
    batch = tiny_batch(am.model, batch=2)
    torch.testing.assert_close(run(am, batch, adapters=Fuse("l1", "l2")),
                               run(am, batch, adapters=Stack("l1", "l2")), rtol=0, atol=0)


# ---------------------------------------------------------------- Fuse


@pytest.mark.parametrize("family", ["bert", "mbart", "t5"])
def test_fuse_layers_at_every_sublayer_point_and_start_as_average(family: str) -> None:
    head = "masked-lm" if family == "bert" else "seq2seq"
    am = model_with(family, head, a="houlsby", b="pfeiffer", l=LoRAConfig())
    am.set_active(Fuse("a", "b"))
    expected = {k for k, p in am.points.items()
                if isinstance(p, SublayerPoint) and ({"a", "b"} & set(p.adapters))}
    assert expected and {k for k, p in am.points.items() if "a+b" in getattr(p, "fusions", {})} == expected
    fusion_layers = [am.points[k].fusions["a+b"] for k in expected]
    for f in fusion_layers:  # by construction: value = identity, no biases, small query/key
        torch.testing.assert_close(f.value.weight, torch.eye(f.value.weight.shape[0]))
        assert not f.value.bias.any() and not f.query.bias.any() and f.key.bias is None
        assert f.query.weight.std() < 0.05 and f.key.weight.std() < 0.05
    batch = tiny_batch(am.model, batch=2)
    fused, average = run(am, batch), run(am, batch, adapters=Average("a", "b"))
    # near-uniform attention at init: close to the average (T5's unnormalised states widen the gap)
    torch.testing.assert_close(fused, average, rtol=0, atol=0.02 * float(average.abs().max()))
    with torch.no_grad():  # with zero query/key the attention is exactly uniform
        for f in fusion_layers:
            f.query.weight.zero_()
    torch.testing.assert_close(run(am, batch), average, rtol=1e-5, atol=1e-5)
    assert (run(am, batch) - run(am, batch, adapters="a")).abs().max() > 1e-3


def test_fusion_mixes_identical_outputs_to_themselves() -> None:
    torch.manual_seed(0)
    fusion = Fusion(8)
    with torch.no_grad():
        fusion.query.weight.normal_(std=1.0)
        fusion.key.weight.normal_(std=1.0)
    h, o = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    torch.testing.assert_close(fusion(h, [o, o, o]), o, rtol=1e-5, atol=1e-6)
    mixed = fusion(h, [o, torch.randn(2, 3, 8)])
    assert mixed.shape == o.shape and not torch.allclose(mixed, o)


def test_deleting_a_child_drops_its_fusion_layers() -> None:
    am = model_with("bert", "base", a="pfeiffer", b="pfeiffer", c="pfeiffer")
    am.set_active(Fuse("a", "b"))
    am.set_active(Fuse("b", "c"))
    am.delete_adapter("a")
    assert {k for p in am.points.values() for k in p.fusions} == {"b+c"}
    am.add_adapter("a", "pfeiffer")  # a new "a" must not inherit the old a+b fusion
    assert {k for p in am.points.values() for k in p.fusions} == {"b+c"}


# ---------------------------------------------------------------- Average weights per point


def layer_of(point) -> int:
    return int(point.key.split(".")[1])  # encoder.<layer>.ffn / encoder.<layer>.attention…


def test_uniform_provider_equals_plain_average() -> None:
    am = model_with("bert", "masked-lm", a="pfeiffer", b="pfeiffer")
    batch = tiny_batch(am.model, batch=2)
    plain = run(am, batch, adapters=Average("a", "b"))
    skewed = Average("a", "b", weights=[0.1, 0.9])
    with am.average_weights(skewed, lambda point: torch.full((2,), 0.5)):
        torch.testing.assert_close(run(am, batch, adapters=skewed), plain)
    assert am.state.weighers == {}  # the block puts the Average's own weights back
    assert (run(am, batch, adapters=skewed) - plain).abs().max() > 1e-4
    assert (run(am, batch, adapters="a") - plain).abs().max() > 1e-4


@pytest.mark.parametrize("config", ["pfeiffer", LoRAConfig(r=4)], ids=["sublayer", "linear"])
def test_per_layer_weights_run_a_different_adapter_per_layer(config) -> None:
    """One-hot on ``a`` in layer 0 and ``b`` in layer 1 == an adapter built from a's layer 0, b's layer 1."""
    am = model_with("bert", "masked-lm", a=config, b=config)
    am.add_adapter("mix", am.configs["a"])
    sa, sb = am.adapter_state_dict("a"), am.adapter_state_dict("b")
    am.load_adapter_state_dict("mix", {k: sa[k] if k.startswith("encoder.0.") else sb[k] for k in sa})
    batch = tiny_batch(am.model, batch=2)
    table = torch.eye(2)  # row = layer: layer 0 runs a, layer 1 runs b
    with am.average_weights(Average("a", "b"), lambda point: table[layer_of(point)]):
        mixed = run(am, batch, adapters=Average("a", "b"))
    torch.testing.assert_close(mixed, run(am, batch, adapters="mix"), rtol=1e-5, atol=1e-5)
    for single in ("a", "b"):
        assert (mixed - run(am, batch, adapters=single)).abs().max() > 1e-4


def test_gradients_reach_the_weight_table() -> None:
    am = model_with("bert", "masked-lm", a="pfeiffer", b="pfeiffer", c="pfeiffer")
    theta = torch.zeros(2, 3, requires_grad=True)
    average = Average("a", "b", "c")
    with am.average_weights(average, lambda point: torch.softmax(theta[layer_of(point)], -1)):
        out = am(**tiny_batch(am.model, batch=2), adapters=average)["logits"]
    (out ** 2).mean().backward()
    assert theta.grad is not None and (theta.grad.abs().sum(-1) > 0).all()  # every layer's row


def test_per_example_routing_with_a_weight_provider() -> None:
    am = model_with("bert", "masked-lm", a="pfeiffer", b="pfeiffer")
    batch = tiny_batch(am.model, batch=4)
    average, table = Average("a", "b"), torch.tensor([[0.8, 0.2], [0.1, 0.9]])
    setups = [average, "a", average, "b"]
    with am.average_weights(average, lambda point: table[layer_of(point)]):
        routed = run(am, batch, adapters=setups)
        for i, setup in enumerate(setups):
            alone = run(am, {k: v[i:i + 1] for k, v in batch.items()}, adapters=setup)
            torch.testing.assert_close(routed[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        assert (routed[0] - run(am, batch, adapters="a")[0]).abs().max() > 1e-4
    assert (run(am, batch, adapters=setups)[0] - routed[0]).abs().max() > 1e-4  # own weights again


def test_bad_average_weights_are_refused() -> None:
    am = model_with("bert", "masked-lm", a="pfeiffer", b="pfeiffer")
    with pytest.raises(XlpeftTypeError, match="`average` can be an Average block; got Stack"):
        am.set_average_weights(Stack("a", "b"), lambda point: None)
    with pytest.raises(XlpeftTypeError, match="`provider` can be a callable"):
        am.set_average_weights(Average("a", "b"), [0.5, 0.5])
    with pytest.raises(XlpeftKeyError, match="zz"):
        am.set_average_weights(Average("a", "zz"), lambda point: None)
    with am.average_weights(Average("a", "b"), lambda point: torch.ones(3) / 3):
        with pytest.raises(XlpeftValueError, match=r"one weight per child \(2\); got \(3,\) at point 'encoder.0.ffn'"):
            run(am, tiny_batch(am.model, batch=2), adapters=Average("a", "b"))
    am.set_average_weights(Average("a", "b"), lambda point: None)  # None: the Average's own weights
    am.delete_adapter("b")
    assert am.state.weighers == {}
