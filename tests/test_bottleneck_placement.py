"""Pfeiffer placement: xlpeft's default vs AdapterHub's ``SeqBnConfig`` (MAD-X), on a tiny BERT.

The reference below is written out the way AdapterHub's ``Adapter.pre_forward``,
``forward`` and ``post_forward`` compute a ``BertOutput`` with adapters, as a
forward hook on a separate copy of the model, so the two code paths share
nothing but the weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tiny import tiny_batch, tiny_model
from xlpeft import AdaptedModel, Stack
from xlpeft.errors import XlpeftValueError
from xlpeft.methods import BottleneckConfig


def _perturb(am: AdaptedModel, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in am.adapter_state_dict(name).items()}
    am.load_adapter_state_dict(name, tensors)


def _weights(am: AdaptedModel, name: str, layer: int, role: str) -> dict[str, torch.Tensor]:
    prefix = f"encoder.{layer}.{role}."
    return {k[len(prefix):]: v for k, v in am.adapter_state_dict(name).items() if k.startswith(prefix)}


def _adapter(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """AdapterHub ``Adapter.forward`` minus residual: up(relu(down(x)))."""
    return nn.functional.linear(torch.relu(nn.functional.linear(x, w["down.weight"], w["down.bias"])),
                                w["up.weight"], w["up.bias"])


def _seq_bn_reference(module: nn.Module, hidden: torch.Tensor, input_tensor: torch.Tensor,
                      adapters: list[dict[str, torch.Tensor]], residual_before_ln: bool | str) -> torch.Tensor:
    """SeqBnConfig on a BertOutput / BertSelfOutput, as AdapterHub's compose_stack runs it:
    every adapter of the Stack runs pre_forward on the previous output, then post_forward once."""
    o = module.dropout(module.dense(hidden))
    for w in adapters:
        residual = o if residual_before_ln is True else None
        h = o + input_tensor                               # original_ln_before (again for each adapter)
        if residual_before_ln == "post_add":
            residual = h
        h = module.LayerNorm(h)
        if residual_before_ln is False:
            residual = h
        o = _adapter(w, h) + residual
    return module.LayerNorm(o + input_tensor)              # original_ln_after


def _reference_model(base: nn.Module, am: AdaptedModel, names: list[str], role: str,
                     residual_before_ln: bool | str) -> nn.Module:
    ref = copy.deepcopy(base)
    for i, layer in enumerate(ref.encoder.layer):
        target = layer.output if role == "ffn_ln" else layer.attention.output
        ws = [_weights(am, n, i, role) for n in names]

        def hook(module, args, output, ws=ws):
            return _seq_bn_reference(module, args[0], args[1], ws, residual_before_ln)
        target.register_forward_hook(hook)
    return ref


@pytest.mark.parametrize("residual_before_ln", [True, False, "post_add"])
@pytest.mark.parametrize("placement", ["ffn", "attn"])
def test_canonical_placement_matches_seq_bn_reference(residual_before_ln, placement) -> None:
    base = tiny_model("bert", "base")
    am = AdaptedModel(copy.deepcopy(base))
    cfg = BottleneckConfig(reduction_factor=4, placement=(placement,), original_ln_before=True,
                           residual_before_ln=residual_before_ln)
    am.add_adapter("lang", cfg)
    _perturb(am, "lang", seed=1)
    batch = tiny_batch(base)
    ref = _reference_model(base, am, ["lang"], f"{placement}_ln", residual_before_ln)
    with torch.no_grad():
        got = am(**batch, adapters="lang").last_hidden_state
        want = ref(**batch).last_hidden_state
        plain = base(**batch).last_hidden_state
    assert (want - plain).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_canonical_stack_matches_adapterhub_stack() -> None:
    """Stack(lang, task): each adapter re-norms the previous output plus the residual input and keeps
    the previous output as its residual (the language adapter's contribution survives in the stream)."""
    base = tiny_model("bert", "base")
    am = AdaptedModel(copy.deepcopy(base))
    cfg = BottleneckConfig(reduction_factor=4, original_ln_before=True)
    am.add_adapter("lang", cfg)
    am.add_adapter("task", cfg.replace(reduction_factor=8))
    _perturb(am, "lang", seed=2)
    _perturb(am, "task", seed=3)
    batch = tiny_batch(base)
    ref = _reference_model(base, am, ["lang", "task"], "ffn_ln", True)
    with torch.no_grad():
        got = am(**batch, adapters=Stack("lang", "task")).last_hidden_state
        want = ref(**batch).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_default_and_canonical_differ_for_identical_weights() -> None:
    base = tiny_model("bert", "base")
    models = {}
    for canonical in (False, True):
        am = AdaptedModel(copy.deepcopy(base))
        am.add_adapter("a", BottleneckConfig(reduction_factor=4, original_ln_before=canonical))
        models[canonical] = am
    _perturb(models[True], "a", seed=4)
    tensors = {k.replace("ffn_ln", "ffn"): v for k, v in models[True].adapter_state_dict("a").items()}
    models[False].load_adapter_state_dict("a", tensors)
    batch = tiny_batch(base)
    with torch.no_grad():
        outs = {c: m(**batch, adapters="a").last_hidden_state for c, m in models.items()}
    assert (outs[True] - outs[False]).abs().max() > 1e-3


def test_canonical_adapter_left_out_of_routing_is_the_backbone() -> None:
    base = tiny_model("bert", "base")
    am = AdaptedModel(copy.deepcopy(base))
    am.add_adapter("a", BottleneckConfig(reduction_factor=4, original_ln_before=True))
    am.add_adapter("b", BottleneckConfig(reduction_factor=4))
    _perturb(am, "a", seed=5)
    batch = tiny_batch(base)
    with torch.no_grad():
        torch.testing.assert_close(am(**batch, adapters="b").last_hidden_state, base(**batch).last_hidden_state)


def test_canonical_placement_needs_a_post_ln_family() -> None:
    am = AdaptedModel(tiny_model("t5", "base"))
    with pytest.raises(XlpeftValueError, match="found no place"):
        am.add_adapter("a", BottleneckConfig(original_ln_before=True))


def test_canonical_placement_refuses_parallel_mode() -> None:
    with pytest.raises(XlpeftValueError, match="original_ln_before=True` can be used with mode 'sequential'"):
        BottleneckConfig(original_ln_before=True, mode="parallel")
    with pytest.raises(XlpeftValueError, match="`residual_before_ln` can be"):
        BottleneckConfig(residual_before_ln="after")


def test_canonical_config_round_trips_through_files(tmp_path) -> None:
    base = tiny_model("bert", "base")
    am = AdaptedModel(copy.deepcopy(base))
    am.add_adapter("a", BottleneckConfig(reduction_factor=4, original_ln_before=True, residual_before_ln=False))
    _perturb(am, "a", seed=6)
    am.save_adapter("a", str(tmp_path / "a"))
    other = AdaptedModel(copy.deepcopy(base))
    other.load_adapter(str(tmp_path / "a"))
    batch = tiny_batch(base)
    with torch.no_grad():
        torch.testing.assert_close(other(**batch, adapters="a").last_hidden_state,
                                   am(**batch, adapters="a").last_hidden_state)


@pytest.mark.parametrize("name, base", [("pfeiffer-seqbn", "pfeiffer"), ("madx-language-seqbn", "madx-language")])
def test_seqbn_presets_are_their_base_preset_with_the_canonical_placement(name, base) -> None:
    from xlpeft.methods import preset
    seqbn, plain = preset(name), preset(base)
    assert [p.method for p in seqbn.parts] == [p.method for p in plain.parts]
    bottleneck = seqbn.parts[0]
    assert bottleneck.original_ln_before and bottleneck == plain.parts[0].replace(original_ln_before=True)
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    am.add_adapter("a", name)
    assert all(".ffn_ln." in k for k in am.adapter_state_dict("a") if not k.startswith("shared."))
