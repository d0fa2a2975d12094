"""Placement and precision per point: fp32 adapters on fp16/bf16 backbones, mixed-dtype
backbones, per-point devices, meta-device construction + ``initialize_adapters``."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import perturb, run, tiny_batch, tiny_config, tiny_model
from transformers import AutoModel

from xlpeft import AdaptedModel, Fuse, Stack
from xlpeft.errors import XlpeftValueError
from xlpeft.methods import BitFitConfig, IA3Config, LoRAConfig


def params(am: AdaptedModel, name: str) -> list[torch.Tensor]:
    return [p for m in am.adapter_modules(name) for p in m.parameters()]


def t5_fp16_with_fp32_wo():
    """A float16 T5 whose FFN ``wo`` stays float32, as ``_keep_in_fp32_modules`` loads it."""
    model = tiny_model("t5").half()
    for stack in (model.encoder, model.decoder):
        for block in stack.block:
            block.layer[-1].DenseReluDense.wo.float()
    return model


def test_bf16_backbone_gets_fp32_lora_and_one_adamw_step_moves_every_entry() -> None:
    model = tiny_model("bert").to(torch.bfloat16)
    batch = tiny_batch(model)
    am = AdaptedModel(model)
    am.add_adapter("lo", LoRAConfig(r=8, targets=("q", "v")), set_active=True)
    perturb(am, "lo", scale=0.05)
    am.train_adapters("lo")
    weights = params(am, "lo")
    assert {p.dtype for p in weights} == {torch.float32} and sum(p.numel() for p in weights) == 2048
    out = am(**batch).last_hidden_state
    assert out.dtype == torch.bfloat16  # the backbone's dtype past every adapter
    before = [p.detach().clone() for p in weights]
    opt = torch.optim.AdamW(weights, lr=1e-4)
    out.float().pow(2).mean().backward()
    opt.step()
    unchanged = sum(int((p.detach() == b).sum()) for p, b in zip(weights, before))
    assert unchanged == 0


def test_adapter_dtype_option() -> None:
    model = tiny_model("bert").to(torch.bfloat16)
    same = AdaptedModel(copy.deepcopy(model), adapter_dtype="backbone")
    same.add_adapter("lo", "lora")
    assert {p.dtype for p in params(same, "lo")} == {torch.bfloat16}
    wide = AdaptedModel(copy.deepcopy(model), adapter_dtype=torch.float64)
    wide.add_adapter("lo", "lora", set_active=True)
    perturb(wide, "lo")
    assert {p.dtype for p in params(wide, "lo")} == {torch.float64}
    assert run(wide, tiny_batch(model)).dtype == torch.bfloat16
    fp32 = AdaptedModel(tiny_model("bert"))  # fp32 backbones: adapters as before, no casts
    fp32.add_adapter("lo", "lora")
    assert all(not m._forward_pre_hooks for m in fp32.adapter_modules("lo"))
    with pytest.raises(XlpeftValueError, match=r"`adapter_dtype` can be None .* got 'half'"):
        AdaptedModel(tiny_model("bert"), adapter_dtype="half")


def test_fp16_t5_with_fp32_wo_runs_the_default_preset_and_mixed_lora() -> None:
    model = t5_fp16_with_fp32_wo()
    reference = tiny_model("t5")  # the same weights in float32
    batch = tiny_batch(model)
    bare, ref_bare = run(model, batch), run(reference, batch)
    am, ref_am = AdaptedModel(model), AdaptedModel(reference)
    for a in (am, ref_am):
        a.add_adapter("pf", "pfeiffer")
        a.add_adapter("lo", LoRAConfig(r=4, targets=("q", "ffn_down")))
        a.set_active(Stack("pf", "lo"))
    for name, seed in (("pf", 1), ("lo", 2)):
        perturb(am, name, scale=0.1, seed=seed)
        ref_am.load_adapter_state_dict(name, am.adapter_state_dict(name))
    assert {p.dtype for p in params(am, "pf") + params(am, "lo")} == {torch.float32}
    out = run(am, batch)
    assert out.dtype == bare.dtype and bool(torch.isfinite(out).all())
    expected = run(ref_am, batch)
    assert (expected - ref_bare).abs().max() > 1e-2  # the adapters act
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_fusion_layers_follow_the_precision_policy() -> None:
    model = tiny_model("bert").to(torch.bfloat16)
    am = AdaptedModel(model)
    am.add_adapter("a", "pfeiffer")
    am.add_adapter("b", "pfeiffer")
    am.set_active(Fuse("a", "b"))
    am.set_active(Fuse("a", "b"))  # a second activation neither re-places nor re-hooks
    fusions = [p.fusions["a+b"] for p in am.points.values() if "a+b" in getattr(p, "fusions", {})]
    assert fusions and all(f.query.weight.dtype == torch.float32 for f in fusions)
    assert all(len(f._forward_hooks) == 1 for f in fusions)
    assert run(am, tiny_batch(model)).dtype == torch.bfloat16


def test_each_adapter_sits_on_the_device_of_the_module_it_adapts() -> None:
    model = tiny_model("bert")
    model.encoder.layer[1].attention.self.query.to("meta")  # a module elsewhere, like a device map
    am = AdaptedModel(model)
    am.add_adapter("lo", LoRAConfig(r=4, targets=("q",)))
    devices = {p.key: next(p.adapters["lo"].parameters()).device.type
               for p in am.points.values() if "lo" in p.adapters}
    assert devices == {"encoder.0.attention.self.query": "cpu", "encoder.1.attention.self.query": "meta"}


def test_meta_device_model_then_initialize_adapters_is_the_identity() -> None:
    real = tiny_model("bert")
    batch = tiny_batch(real)
    ref = run(real, batch)
    with torch.device("meta"):
        meta = AutoModel.from_config(tiny_config("bert")).eval()
    am = AdaptedModel(meta)
    am.add_adapter("pf", "pfeiffer")
    am.add_adapter("lo", "lora")
    am.add_adapter("ia", IA3Config())
    am.add_adapter("bf", BitFitConfig())
    am.set_active(Stack("pf", "lo", "ia", "bf"))
    assert {p.device.type for p in am.parameters()} == {"meta"}
    am.to_empty(device="cpu")
    am.model.load_state_dict(real.state_dict())
    for name, buf in real.named_buffers():  # non-persistent buffers are not in a state dict
        am.model.get_buffer(name).copy_(buf)
    with torch.no_grad():
        for p in params(am, "ia"):
            p.fill_(3.0)  # what to_empty may leave: not the identity
    lora = next(iter(am.adapter_modules("lo")))
    assert am.initialize_adapters() is am
    assert next(iter(am.adapter_modules("lo"))) is lora  # same modules, new values
    torch.testing.assert_close(run(am, batch), ref, rtol=1e-6, atol=1e-6)


def test_generated_adapters_on_a_bf16_backbone_get_an_fp32_generator() -> None:
    from xlpeft.generators import build_generator

    am = AdaptedModel(tiny_model("bert", "masked-lm").to(torch.bfloat16))
    gen = build_generator("madg", am, reduction_factor=4, language_dim=8, typology_hidden=16, basis=4)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.3 * torch.randn_like(p))
    gen.attach(am, "swh")
    assert {p.dtype for p in gen.parameters()} == {torch.float32}
    batch = tiny_batch(am.model)
    out, bare = run(am, batch, adapters="swh"), run(am, batch)
    assert out.dtype == torch.bfloat16 and (out.float() - bare.float()).abs().max() > 1e-2


@pytest.mark.parametrize("preset", ["parallel", "mam", "prefix", "prompt", "compacter", "madx-language"])
def test_fp16_t5_with_fp32_wo_runs_every_kind_of_point(preset: str) -> None:
    model = t5_fp16_with_fp32_wo()
    batch = tiny_batch(model)
    bare = run(model, batch)
    am = AdaptedModel(model)
    am.add_adapter("x", preset, set_active=True)
    perturb(am, "x", scale=0.05)
    out = run(am, batch)
    assert out.dtype == bare.dtype and bool(torch.isfinite(out).all())
    assert (out.float() - bare.float()).abs().max() > 1e-3


def test_adapters_of_offloaded_modules_live_where_the_weights_run() -> None:
    accelerate = pytest.importorskip("accelerate")
    plain, offloaded = tiny_model("bert"), tiny_model("bert")
    batch = tiny_batch(plain)
    accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))  # weights on meta between calls
    ref, am = AdaptedModel(plain), AdaptedModel(offloaded)
    for a in (ref, am):
        a.add_adapter("lo", LoRAConfig(r=4, targets=("q",)), set_active=True)
    perturb(ref, "lo")
    am.load_adapter_state_dict("lo", ref.adapter_state_dict("lo"))
    assert {p.device.type for p in params(am, "lo")} == {"cpu"}
    torch.testing.assert_close(run(am, batch), run(ref, batch), rtol=1e-6, atol=1e-6)
    with pytest.raises(XlpeftValueError, match=r"merge can fold adapters into loaded weights; got .* meta"):
        am.merge("lo")
    assert not am.is_merged("lo")
