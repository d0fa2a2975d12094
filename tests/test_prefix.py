"""Prefix tuning: attention-function injection, routing, collapse, files, generation."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import ALL_FAMILIES, tiny_batch, tiny_model

from xlpeft import AdaptedModel, Average, Stack
from xlpeft.errors import XlpeftValueError
from xlpeft.methods import config_from_dict
from xlpeft.methods.bottleneck import BottleneckConfig
from xlpeft.methods.prefix import PrefixConfig
from xlpeft.core.attention import PrefixPoint, collapse_prefix

SMALL = dict(prefix_length=3, bottleneck_size=8)


def _wrap(family: str, head: str = "base") -> tuple[AdaptedModel, dict]:
    model = tiny_model(family, head)
    return AdaptedModel(model), tiny_batch(model)


def _out(am: AdaptedModel, batch: dict, **kw) -> torch.Tensor:
    return am(**batch, **kw)[0]


def _base(am: AdaptedModel, batch: dict) -> torch.Tensor:
    with am.disable_adapters():
        return _out(am, batch)


def _impls(am: AdaptedModel) -> set[str]:
    return {p.attention.config._attn_implementation for p in am.points.values()
            if isinstance(p, PrefixPoint)} or {am.model.config._attn_implementation}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_prefix_changes_outputs_disable_and_delete_restore(family: str) -> None:
    am, batch = _wrap(family)
    base = _out(am, batch)
    am.add_adapter("a", PrefixConfig(**SMALL), set_active=True)
    assert _impls(am) == {"xlpeft_sdpa"}
    configs = {id(p.attention.config): p.attention.config for p in am.points.values()}
    assert (_out(am, batch) - base).abs().max() > 1e-3
    torch.testing.assert_close(_base(am, batch), base)
    am.delete_adapter("a")
    assert not am.points and {c._attn_implementation for c in configs.values()} == {"sdpa"}
    torch.testing.assert_close(_out(am, batch), base)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_routed_mixed_batch_equals_each_group_alone(family: str) -> None:
    am, batch = _wrap(family)
    base = _out(am, batch)
    am.add_adapter("a", PrefixConfig(**SMALL))
    am.add_adapter("b", PrefixConfig(prefix_length=2, reparametrize=False, gated=True))
    am.add_adapter("z", BottleneckConfig())  # identity, and no prefix: its rows see none
    routes = ["a", "z", "b", "a"]
    mixed = _out(am, batch, adapters=routes)
    for name in ("a", "b", "z"):
        rows = [i for i, r in enumerate(routes) if r == name]
        alone = _out(am, {k: v[rows] for k, v in batch.items()}, adapters=name)
        torch.testing.assert_close(mixed[rows], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_gradients_reach_only_prefixes_in_the_batch(family: str) -> None:
    am, batch = _wrap(family)
    for name in ("a", "b", "c"):
        am.add_adapter(name, PrefixConfig(**SMALL, gated=name == "b"))
    am.train_adapters("a", "b", "c")
    _out(am, batch, adapters=["a", "b", "b", "a"]).pow(2).sum().backward()
    grads = {n: p.grad for n, p in am.named_parameters() if p.requires_grad}
    for name in ("a", "b"):
        mine = [g for n, g in grads.items() if f".{name}." in n or n.startswith(f"shared.{name}.")]
        assert mine and all(g is not None and g.abs().sum() > 0 for g in mine)
    assert all(g is None for n, g in grads.items() if ".c." in n or n.startswith("shared.c."))
    assert all(p.grad is None for p in am.model.parameters())


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_collapse_keeps_outputs_and_save_load_round_trips(family: str, tmp_path) -> None:
    am, batch = _wrap(family)
    am.add_adapter("a", PrefixConfig(**SMALL, gated=True), set_active=True)
    before = _out(am, batch)
    am.save_adapter("a", tmp_path / "full")
    n_full = sum(t.numel() for t in am.adapter_state_dict("a").values())
    collapse_prefix(am, "a")
    torch.testing.assert_close(_out(am, batch), before, atol=1e-5, rtol=1e-4)
    assert am.configs["a"] == PrefixConfig(**SMALL, gated=True, reparametrize=False)
    keys = am.adapter_state_dict("a")
    assert "a" not in am.shared and all(k.endswith((".kv", ".gate.weight", ".gate.bias")) for k in keys)
    assert sum(t.numel() for t in am.adapter_state_dict("a").values()) < n_full
    am.save_adapter("a", tmp_path / "small")
    for folder, reparam in (("full", True), ("small", False)):
        fresh, _ = _wrap(family)
        name = fresh.load_adapter(tmp_path / folder, set_active=True)
        assert fresh.configs[name].reparametrize is reparam
        torch.testing.assert_close(_out(fresh, batch), before, atol=1e-5, rtol=1e-4)


def test_stack_concatenates_and_average_mixes_prefixes() -> None:
    am, batch = _wrap("bert")
    direct = dict(prefix_length=2, reparametrize=False)
    for name in ("a", "b", "ab"):
        am.add_adapter(name, PrefixConfig(**{**direct, "prefix_length": 4 if name == "ab" else 2}))
    with torch.no_grad():
        for point in am.points.values():
            a, b = point.adapters["a"].kv, point.adapters["b"].kv
            point.adapters["ab"].kv.copy_(torch.cat([a, b], dim=2))
    torch.testing.assert_close(_out(am, batch, adapters=Stack("a", "b")),
                               _out(am, batch, adapters="ab"), atol=1e-5, rtol=1e-4)
    mixed = _out(am, batch, adapters=Average("a", "b", weights=[0.25, 0.75]))
    assert (mixed - _out(am, batch, adapters="a")).abs().max() > 1e-4
    with pytest.raises(XlpeftValueError, match="Average can mix prefixes of one length"):
        _out(am, batch, adapters=Average("a", "ab"))


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_eager_models_match_sdpa(family: str) -> None:
    outs = []
    for impl in ("sdpa", "eager"):
        model = tiny_model(family)
        model.set_attn_implementation(impl)
        am = AdaptedModel(model)
        torch.manual_seed(1)
        am.add_adapter("a", PrefixConfig(**SMALL, gated=True), set_active=True)
        assert _impls(am) == {f"xlpeft_{impl}"}
        batch = tiny_batch(model)
        outs.append(_out(am, batch, adapters=["a", "a", "a", "a"]))
        am.delete_adapter("a")
        assert model.config._attn_implementation == impl
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_unsupported_attention_implementation_is_refused_cleanly() -> None:
    am, _ = _wrap("bert")
    am.model.config._attn_implementation = "flex_attention"
    with pytest.raises(XlpeftValueError, match="`attn_implementation` can be 'sdpa', 'eager' for prefix and prompt tuning; got 'flex_attention'"):
        am.add_adapter("a", "prefix")
    assert not am.points and not am.configs and "a" not in am.shared


@pytest.mark.parametrize("family", ["t5", "mbart", "marian"])
def test_decoder_prefix_is_causal_and_generation_uses_it(family: str) -> None:
    am, batch = _wrap(family, "seq2seq")
    am.add_adapter("a", PrefixConfig(**SMALL, stacks=("decoder",)))
    am.add_adapter("b", PrefixConfig(prefix_length=2, reparametrize=False, stacks=("decoder",)))
    am.set_active("a")
    later = dict(batch, decoder_input_ids=batch["decoder_input_ids"].clone())
    later["decoder_input_ids"][:, -1] += 1
    torch.testing.assert_close(_out(am, batch)[:, :-1], _out(am, later)[:, :-1])
    gen = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
               do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = am.generate(**gen, use_cache=True)
    uncached = am.generate(**gen, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-4, rtol=1e-4)
    with am.disable_adapters():
        plain = am.generate(**gen)
    assert not torch.allclose(torch.stack(plain.scores), torch.stack(cached.scores))
    beams = dict(gen, num_beams=2, output_scores=False, return_dict_in_generate=False)
    routed = am.generate(**beams, adapters=["a", "b", "b", "a"])
    for name in ("a", "b"):
        rows = [0, 3] if name == "a" else [1, 2]
        alone = am.generate(**dict(beams, input_ids=batch["input_ids"][rows],
                                   attention_mask=batch["attention_mask"][rows]), adapters=name)
        assert torch.equal(routed[rows, :alone.shape[1]], alone)


@pytest.mark.parametrize("family", ["bert", "t5"])
@pytest.mark.parametrize("preset", ["mam", "unipelt"])
def test_mam_and_unipelt_presets_build_and_train(family: str, preset: str) -> None:
    am, batch = _wrap(family)
    base = _out(am, batch)
    am.add_adapter("u", preset, set_active=True)
    am.train_adapters("u")
    out = _out(am, batch)
    assert (out - base).abs().max() > 1e-3
    out.pow(2).sum().backward()
    prefix_params = [p for n, p in am.named_parameters() if "attn" in n and ".u." in n]
    assert prefix_params and all(p.grad is not None for p in prefix_params)


def test_deep_copy_keeps_prefixes() -> None:
    am, batch = _wrap("bert")
    am.add_adapter("a", PrefixConfig(**SMALL), set_active=True)
    twin = copy.deepcopy(am)
    torch.testing.assert_close(_out(twin, batch), _out(am, batch))


def test_config_checks_and_dict_round_trip() -> None:
    with pytest.raises(XlpeftValueError, match="`prefix_length` must be > 0; got 0"):
        PrefixConfig(prefix_length=0)
    with pytest.raises(XlpeftValueError, match="`non_linearity` can be"):
        PrefixConfig(non_linearity="sigmoidish")
    config = PrefixConfig(prefix_length=5, gated=True, leave_out=(0,), cross_attention=False)
    assert config_from_dict(config.to_dict()) == config
    am, _ = _wrap("mbart")
    am.add_adapter("a", config)
    assert sorted(am.points) == ["decoder-1-self_attn", "encoder-1-self_attn"]
