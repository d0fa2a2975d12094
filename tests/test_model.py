"""AdaptedModel end to end on every family: identity at init, disabling,
merging, leave_out and the parameter report.

Every equivalence that could pass trivially (a zero-initialised adapter is the
identity) is also checked with perturbed, non-identity adapter weights.
"""

from __future__ import annotations

import pytest
import torch
from tiny import default_head as head, main_output as main, run, perturb, ALL_FAMILIES, ENCODER_FAMILIES, HIDDEN, LAYERS, family_heads, tiny_batch, tiny_model

from xlpeft import AdaptedModel, Fuse, Stack, XlpeftError
from xlpeft.methods import BitFitConfig, BottleneckConfig, IA3Config, LoRAConfig

PRESETS = ["pfeiffer", "houlsby", "parallel", "lora", "ia3", "bitfit", "madx-language"]
ALL_ROLES = ("q", "k", "v", "o", "ffn_up", "ffn_down", "cross_q", "cross_k", "cross_v", "cross_o")
MERGEABLE = {
    "lora": LoRAConfig(r=4, alpha=8, targets=ALL_ROLES),
    "ia3": IA3Config(targets=("k", "v", "ffn_down", "cross_k", "cross_v"),
                     input_scaled=("ffn_down",)),
    "bitfit": BitFitConfig(targets=ALL_ROLES),
}


def setup(family: str, hd: str | None = None):
    model = tiny_model(family, hd or head(family))
    batch = tiny_batch(model, batch=2)
    ref = run(model, batch)
    return model, batch, ref


def backbone_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------- identity at init


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_zero_init_is_backbone(family: str, preset: str) -> None:
    model, batch, ref = setup(family)
    am = AdaptedModel(model)
    am.add_adapter("a", preset, set_active=True)
    torch.testing.assert_close(run(am, batch), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_perturbed_changes_output_and_disable_restores(family: str, preset: str) -> None:
    model, batch, ref = setup(family)
    am = AdaptedModel(model)
    am.add_adapter("a", preset, set_active=True)
    perturb(am, "a")
    adapted = run(am, batch)
    assert (adapted - ref).abs().max() > 1e-3, "a non-identity adapter must change the output"
    with am.disable_adapters():
        torch.testing.assert_close(run(am, batch), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(am, batch), adapted, rtol=0, atol=0)


@pytest.mark.parametrize("family_head", family_heads(), ids=lambda fh: f"{fh[0]}-{fh[1]}")
def test_every_head_is_adapted(family_head: tuple[str, str]) -> None:
    family, hd = family_head
    model, batch, ref = setup(family, hd)
    am = AdaptedModel(model)
    am.add_adapter("a", "houlsby", set_active=True)
    perturb(am, "a")
    assert (run(am, batch) - ref).abs().max() > 1e-3
    assert run(am, batch, adapters="a").shape == ref.shape
    am.set_active(None)
    torch.testing.assert_close(run(am, batch), ref, rtol=0, atol=0)


def test_backbone_is_frozen_and_untouched() -> None:
    model = tiny_model("bert", "masked-lm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    am = AdaptedModel(model)
    am.add_adapter("a", "madx-language")
    am.add_adapter("l", "lora")
    am.train_adapters("a", "l")
    assert not any(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(am.adapter_names) == {"a", "l"}
    am.delete_adapter("l")
    assert am.adapter_names == ["a"] and not any("l" in p.adapters for p in am.points.values())


@pytest.mark.parametrize("family, pattern, stacks", [  # a head outside every stack ignores `stacks`
    ("bert", r"cls\.predictions\.decoder", ("encoder",)), ("mbart", "lm_head", ("encoder",)),
    ("encoder-decoder", r".*predictions\.decoder", ("decoder",)),
])
def test_target_patterns_reach_the_lm_head(family: str, pattern: str, stacks: tuple[str, ...]) -> None:
    model, batch, ref = setup(family)
    am = AdaptedModel(model)
    am.add_adapter("h", LoRAConfig(r=2, target_patterns=(pattern,), stacks=stacks), set_active=True)
    assert len(am.points) == 1
    perturb(am, "h")
    assert (run(am, batch) - ref).abs().max() > 1e-3  # the head runs after the last stack
    with am.disable_adapters():
        torch.testing.assert_close(run(am, batch), ref, rtol=0, atol=0)


# ---------------------------------------------------------------- merging


@pytest.mark.parametrize("method", list(MERGEABLE))
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_merge_equals_unmerged_and_unmerge_restores(family: str, method: str) -> None:
    model, batch, ref = setup(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    am = AdaptedModel(model)
    am.add_adapter("m", MERGEABLE[method], set_active=True)
    perturb(am, "m", scale=0.2)
    unmerged = run(am, batch)
    assert (unmerged - ref).abs().max() > 1e-3
    am.merge("m")
    assert am.is_merged("m")
    torch.testing.assert_close(run(am, batch), unmerged, rtol=1e-4, atol=1e-4)
    with am.disable_adapters():  # merged + disabled == backbone
        torch.testing.assert_close(run(am, batch), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(am, batch), unmerged, rtol=1e-4, atol=1e-4)
    am.set_active(None)  # a merged adapter applies whatever is active
    torch.testing.assert_close(run(am, batch), unmerged, rtol=1e-4, atol=1e-4)
    am.unmerge("m")
    state = model.state_dict()
    for key, value in original.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(run(am, batch), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["t5", "mt5"])
def test_bitfit_unmerge_restores_state_dict_keys(family: str) -> None:
    model = tiny_model(family, "seq2seq")
    keys = set(model.state_dict())
    am = AdaptedModel(model)
    am.add_adapter("m", BitFitConfig())
    am.merge("m")
    am.unmerge("m")
    assert set(model.state_dict()) == keys


def test_merge_bottleneck_lists_mergeable_methods() -> None:
    am = AdaptedModel(tiny_model("bert"))
    am.add_adapter("b", "pfeiffer")
    with pytest.raises(XlpeftError, match=r"cannot be merged.*lora.*ia3.*bitfit"):
        am.merge("b")
    assert not am.is_merged("b")
    am.add_adapter("g", LoRAConfig(gated=True))
    with pytest.raises(XlpeftError, match="cannot be merged"):
        am.merge("g")
    am.add_adapter("l", "lora")
    am.merge("l")
    with pytest.raises(XlpeftError, match="already merged"):
        am.merge("l")
    am.unmerge("l")
    with pytest.raises(XlpeftError, match="not merged"):
        am.unmerge("l")


def test_delete_merged_adapter_unmerges_it() -> None:
    model, batch, ref = setup("bert")
    am = AdaptedModel(model)
    am.add_adapter("m", MERGEABLE["lora"], set_active=True)
    perturb(am, "m")
    am.merge("m")
    am.delete_adapter("m")
    assert am.active is None and not am.points
    torch.testing.assert_close(run(am, batch), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- leave_out, report


@pytest.mark.parametrize("family", ["bert", "t5", "mbart"])
def test_leave_out_last_block(family: str) -> None:
    am = AdaptedModel(tiny_model(family, head(family)))
    am.add_adapter("b", BottleneckConfig(placement=("attn", "ffn"), leave_out=(-1,)))
    am.add_adapter("l", LoRAConfig(targets=("q",), leave_out=(-1,)))
    for stack, n in am.backbone.num_layers().items():
        for name in ("b", "l"):
            layers = {int(k.split("-")[1]) for k, p in am.points.items()
                      if k.startswith(stack) and name in p.adapters and k.split("-")[1].isdigit()}
            assert layers == set(range(n - 1)), (stack, name, layers)


def test_parameter_report_matches_analytic_counts() -> None:
    h, rf, r = HIDDEN, 16, 4
    am = AdaptedModel(tiny_model("mbart", "seq2seq"))
    am.add_adapter("pf", "pfeiffer")
    am.add_adapter("lo", LoRAConfig(r=r, targets=("q", "v", "ffn_up")))
    am.add_adapter("lang", "madx-language")
    report = {row.name: row for row in am.parameter_report().adapters}
    blocks = 2 * LAYERS  # encoder + decoder
    w = h // rf
    assert report["pf"].parameters == blocks * (h * w + w + w * h + h)
    ffn = 64  # tiny FFN width
    assert report["lo"].parameters == blocks * (r * (h + h) * 2 + r * (h + ffn))
    w2, half = h // 2, h // 2
    coupling = 2 * (half * (half // 2) + half // 2 + (half // 2) * half + half)
    assert report["lang"].parameters == blocks * (h * w2 + w2 + w2 * h + h) + coupling
    assert report["lang"].method == "union"
    assert report["pf"].stored_bytes == 4 * report["pf"].parameters
    assert report["pf"].changed == blocks * (h * w + w)  # the up-projection starts at zero


def test_parameter_report_trainable_follows_train_adapters() -> None:
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    am.add_adapter("a", "pfeiffer")
    am.add_adapter("b", "madx-language")

    def trainable() -> dict[str, int]:
        rep = am.parameter_report()
        assert rep.backbone == sum(p.numel() for p in am.model.parameters())
        return {row.name: row.trainable for row in rep.adapters}

    params = {row.name: row.parameters for row in am.parameter_report().adapters}
    am.train_adapters("a")
    assert trainable() == {"a": params["a"], "b": 0}
    assert am.parameter_report().backbone_trainable == 0
    am.train_adapters("b")
    assert trainable() == {"a": 0, "b": params["b"]}
    am.train_adapters("a", "b")
    assert trainable() == params
    am.train_adapters(Stack("a", "b"), backbone_params=["cls.predictions"])
    assert trainable() == params
    assert am.parameter_report().backbone_trainable > 0
    text = str(am.parameter_report())
    assert "bottleneck" in text and "union" in text and "backbone:" in text


def test_failed_add_adapter_after_success_keeps_earlier_adapters() -> None:
    model, batch, _ = setup("bert")
    am = AdaptedModel(model)
    am.add_adapter("a", "houlsby", set_active=True)
    perturb(am, "a")
    before = run(am, batch)
    keys, hooks = list(am.points), backbone_hooks(model)
    with pytest.raises(XlpeftError):
        am.add_adapter("z", LoRAConfig(targets=("cross_q",)))  # no such place in an encoder
    assert list(am.points) == keys and backbone_hooks(model) == hooks
    torch.testing.assert_close(run(am, batch), before, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bert", "mbart"])
def test_deepcopy_is_an_independent_working_copy(family: str) -> None:
    """EMA/teacher copies (test-time adaptation) must route their own stacks."""
    import copy

    model, batch, ref = setup(family)
    am = AdaptedModel(model)
    am.add_adapter("a", "houlsby")
    am.add_adapter("c", "madx-language")
    perturb(am, "a")
    perturb(am, "c", seed=1)
    am.set_active(Stack("c", "a"))
    adapted = run(am, batch)
    clone = copy.deepcopy(am)
    torch.testing.assert_close(run(clone, batch), adapted, rtol=0, atol=0)
    torch.testing.assert_close(run(clone, batch, adapters=["a", "c"]), run(am, batch, adapters=["a", "c"]),
                               rtol=0, atol=0)
    clone.delete_adapter("a")
    clone.delete_adapter("c")
    torch.testing.assert_close(run(clone, batch), ref, rtol=0, atol=0)
    torch.testing.assert_close(run(am, batch), adapted, rtol=0, atol=0)


def test_adapters_follow_the_backbone_dtype() -> None:
    model = tiny_model("bert", "masked-lm").double()
    am = AdaptedModel(model)
    am.add_adapter("a", "houlsby")
    am.add_adapter("c", "madx-language")
    am.set_active(Fuse("a", "c"))  # fusion layers are made now, in the backbone's dtype
    assert {p.dtype for p in am.parameters()} == {torch.float64}
    am.to(torch.bfloat16)
    out = run(am, tiny_batch(model, batch=2), adapters=[Fuse("a", "c"), Stack("c", "a")])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
