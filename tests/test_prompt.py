"""Prompt tuning (shallow soft tokens at the first block's self-attention)."""

from __future__ import annotations

import pytest
import torch
from tiny import ALL_FAMILIES, ENCODER_FAMILIES, tiny_batch, tiny_model

from xlpeft import AdaptedModel, Stack
from xlpeft.errors import XlpeftValueError
from xlpeft.methods import config_from_dict
from xlpeft.methods.lora import LoRAConfig
from xlpeft.methods.prefix import PrefixConfig
from xlpeft.methods.prompt import PromptConfig


def _wrap(family: str, head: str | None = None) -> tuple[AdaptedModel, dict]:
    head = head or ("token-cls" if family in ENCODER_FAMILIES else "base")
    model = tiny_model(family, head)
    return AdaptedModel(model), tiny_batch(model)


def _out(am: AdaptedModel, batch: dict, **kw) -> torch.Tensor:
    return am(**batch, **kw)[0]


def _encoded(am: AdaptedModel, batch: dict) -> torch.Tensor:
    out = am(**batch)
    return getattr(out, "encoder_last_hidden_state", None) if "decoder_input_ids" in batch else out[0]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_prompt_changes_outputs_keeps_length_and_disables(family: str) -> None:
    am, batch = _wrap(family)
    base = _encoded(am, batch)
    am.add_adapter("p", PromptConfig(prompt_length=4), set_active=True)
    assert list(am.points) == ["encoder-prompt"]
    point = am.points["encoder-prompt"]
    first = am.backbone.blocks("encoder")[0].get_submodule(am.layout.stacks["encoder"].attn)
    assert point.attention is first
    out = _encoded(am, batch)
    assert out.shape == base.shape  # token-classification logits stay aligned
    assert (out - base).abs().max() > 1e-3 * base.abs().max()
    with am.disable_adapters():
        torch.testing.assert_close(_encoded(am, batch), base)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_routed_prompts_equal_each_group_alone(family: str) -> None:
    am, batch = _wrap(family)
    base = _out(am, batch)
    am.add_adapter("p", PromptConfig(prompt_length=3))
    am.add_adapter("q", PromptConfig(prompt_length=2, init="vocab"))
    am.add_adapter("z", LoRAConfig(targets=("k", "v")))  # identity; hooks on k/v must not see the prompt
    routes = ["p", "z", "q", "p"]
    mixed = _out(am, batch, adapters=routes)
    for name in ("p", "q", "z"):
        rows = [i for i, r in enumerate(routes) if r == name]
        alone = _out(am, {k: v[rows] for k, v in batch.items()}, adapters=name)
        torch.testing.assert_close(mixed[rows], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_gradients_reach_only_prompts_in_the_batch(family: str) -> None:
    am, batch = _wrap(family)
    for name in ("p", "q", "r"):
        am.add_adapter(name, PromptConfig(prompt_length=2))
    am.train_adapters("p", "q", "r")
    _out(am, batch, adapters=["p", "q", "q", "p"]).pow(2).sum().backward()
    grads = {n.split(".")[-2]: p.grad for n, p in am.named_parameters() if p.requires_grad}
    assert sorted(grads) == ["p", "q", "r"]
    assert grads["p"].abs().sum() > 0 and grads["q"].abs().sum() > 0 and grads["r"] is None
    assert all(p.grad is None for p in am.model.parameters())


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_save_load_round_trip(family: str, tmp_path) -> None:
    am, batch = _wrap(family)
    am.add_adapter("p", PromptConfig(prompt_length=3, init="vocab"), set_active=True)
    expected = _out(am, batch)
    am.save_adapter("p", tmp_path / "p")
    fresh, _ = _wrap(family)
    fresh.load_adapter(tmp_path / "p", set_active=True)
    torch.testing.assert_close(_out(fresh, batch), expected)
    assert fresh.configs["p"] == PromptConfig(prompt_length=3, init="vocab")


def test_vocab_and_random_init() -> None:
    am, _ = _wrap("bert")
    am.add_adapter("v", PromptConfig(prompt_length=5, init="vocab"))
    am.add_adapter("r", PromptConfig(prompt_length=5))
    vocab = am.model.get_input_embeddings().weight
    rows = am.points["encoder-prompt"].adapters["v"].embedding
    assert all(any(torch.equal(row, w) for w in vocab) for row in rows)
    random = am.points["encoder-prompt"].adapters["r"].embedding
    assert random.abs().max() <= 0.5 and not any(torch.equal(random[0], w) for w in vocab)


def test_decoder_prompts_generate_with_and_without_cache() -> None:
    am, batch = _wrap("t5", "seq2seq")
    am.add_adapter("p", PromptConfig(prompt_length=3, stacks=("encoder", "decoder")), set_active=True)
    assert sorted(am.points) == ["decoder-prompt", "encoder-prompt"]
    gen = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
               do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached, uncached = am.generate(**gen, use_cache=True), am.generate(**gen, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-4, rtol=1e-4)


def test_prompt_stacks_with_a_prefix() -> None:
    am, batch = _wrap("bert")
    am.add_adapter("p", PromptConfig(prompt_length=2))
    am.add_adapter("a", PrefixConfig(prefix_length=2, reparametrize=False))
    both = _out(am, batch, adapters=Stack("p", "a"))
    for alone in ("p", "a"):
        assert (both - _out(am, batch, adapters=alone)).abs().max() > 1e-4
    am.delete_adapter("a")
    assert am.model.config._attn_implementation == "xlpeft_sdpa"  # the prompt still needs it
    am.delete_adapter("p")
    assert am.model.config._attn_implementation == "sdpa"


def test_config_checks_and_dict_round_trip() -> None:
    with pytest.raises(XlpeftValueError, match="`init` can be 'random', 'vocab'; got 'zeros'"):
        PromptConfig(init="zeros")
    with pytest.raises(XlpeftValueError, match="`prompt_length` must be > 0; got -1"):
        PromptConfig(prompt_length=-1)
    config = PromptConfig(prompt_length=7, init="vocab", stacks=("decoder",))
    assert config_from_dict(config.to_dict()) == config
