"""Intrinsic prompt tuning (Qin et al. 2021): a decoded prompt acts exactly as the same plain soft prompt."""

from __future__ import annotations

import pytest
import torch
from tiny import HIDDEN, perturb, run, tiny_batch, tiny_model

from xlpeft import AdaptedModel
from xlpeft.errors import XlpeftValueError
from xlpeft.methods import IntrinsicPromptConfig, PromptConfig, preset
from xlpeft.methods.intrinsic_prompt import subspace_from_prompts

STAGE1 = IntrinsicPromptConfig(prompt_length=4, intrinsic_dim=3, decoder_hidden=8)
STAGE2 = STAGE1.replace(train_decoder=False)
TOL = 1e-5


def _module(am: AdaptedModel, name: str = "a"):
    return next(iter(am.adapter_modules(name)))


def _as_plain_prompt(am: AdaptedModel, prompt: torch.Tensor) -> AdaptedModel:
    plain = AdaptedModel(tiny_model("bert", "masked-lm"))
    plain.add_adapter("p", PromptConfig(prompt_length=prompt.shape[0]), set_active=True)
    plain.load_adapter_state_dict("p", {"encoder.prompt.embedding": prompt.detach().clone()})
    return plain


@pytest.mark.parametrize("config", [STAGE1, STAGE2, STAGE1.replace(decoder_hidden=0)],
                         ids=["stage1", "stage2", "linear"])
def test_outputs_equal_a_plain_prompt_holding_the_decoded_tokens(config) -> None:
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    am.add_adapter("a", config, set_active=True)
    module = _module(am)
    z = module.code.detach()
    if config.decoder_hidden:  # the decoder by hand
        hidden = torch.tanh(module.dec_in_weight @ z + module.dec_in_bias)
    else:
        hidden = z
    prompt = (module.dec_out_weight @ hidden + module.dec_out_bias).view(4, HIDDEN)
    batch = tiny_batch(am.model)
    with am.disable_adapters():
        bare = run(am, batch)
    got = run(am, batch)
    assert (got - bare).abs().max() > 1e-3
    assert (got - run(_as_plain_prompt(am, prompt), batch)).abs().max() <= TOL


def test_stage_two_trains_only_the_code_under_the_stage_one_decoder(tmp_path) -> None:
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    am.add_adapter("s1", STAGE1)
    perturb(am, "s1")
    am.add_adapter("s2", STAGE2)
    decoder = {k: v for k, v in am.adapter_state_dict("s1").items() if ".dec_" in k}
    code = {k: v for k, v in am.adapter_state_dict("s2").items() if k.endswith(".code")}
    am.load_adapter_state_dict("s2", {**decoder, **code})
    assert sum(p.numel() for m in am.adapter_modules("s2") for p in m.parameters()) == 3  # k
    am.train_adapters("s2")
    am.set_active("s2")
    batch = tiny_batch(am.model)
    am(**batch)["logits"].square().mean().backward()
    assert _module(am, "s2").code.grad.abs().sum() > 0
    assert all(p.grad is None for p in _module(am, "s1").parameters())
    am.save_adapter("s2", str(tmp_path / "s2"))  # the frozen decoder travels with the code
    fresh = AdaptedModel(tiny_model("bert", "masked-lm"))
    fresh.load_adapter(str(tmp_path / "s2"), set_active=True)
    assert (run(fresh, batch) - run(am, batch)).abs().max() == 0


def test_mixed_batch_equals_each_prompt_alone_and_merge_is_refused() -> None:
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    am.add_adapter("a", STAGE1)
    am.add_adapter("b", STAGE1.replace(prompt_length=2))
    perturb(am, "a", seed=1)
    batch = tiny_batch(am.model)
    plan = ["a", "b", "b", "a"]
    mixed = run(am, batch, adapters=plan)
    for name in ("a", "b"):
        am.set_active(name)
        rows = [i for i, n in enumerate(plan) if n == name]
        assert (mixed[rows] - run(am, batch)[rows]).abs().max() <= TOL
    with pytest.raises(XlpeftValueError, match=r"adapter 'a' \(intrinsic_prompt\) cannot be merged"):
        am.merge("a")


def test_subspace_from_prompts_reconstructs_prompts_of_rank_k() -> None:
    gen = torch.Generator().manual_seed(0)
    basis, mean = torch.randn(2, 4 * HIDDEN, generator=gen), torch.randn(4 * HIDDEN, generator=gen)
    prompts = (torch.randn(6, 2, generator=gen) @ basis + mean).view(6, 4, HIDDEN)
    decoder, codes = subspace_from_prompts(prompts, 2)
    rebuilt = (codes @ decoder["dec_out_weight"].t() + decoder["dec_out_bias"]).view(6, 4, HIDDEN)
    assert (rebuilt - prompts).abs().max() <= 1e-4
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    am.add_adapter("t", IntrinsicPromptConfig(prompt_length=4, intrinsic_dim=2, decoder_hidden=0,
                                              train_decoder=False), set_active=True)
    am.load_adapter_state_dict("t", {f"encoder.prompt.{k}": v for k, v in decoder.items()}
                               | {"encoder.prompt.code": codes[3]})
    batch = tiny_batch(am.model)
    assert (run(am, batch) - run(_as_plain_prompt(am, prompts[3]), batch)).abs().max() <= 1e-4
    with pytest.raises(XlpeftValueError, match="with at least k=9 tasks"):
        subspace_from_prompts(prompts, 9)


def test_parameter_count_and_checks() -> None:
    am = AdaptedModel(tiny_model("bert"))
    am.add_adapter("a", STAGE1)
    k, h, out = 3, 8, 4 * HIDDEN
    assert sum(p.numel() for m in am.adapter_modules("a") for p in m.parameters()) == k + h * k + h + out * h + out
    with pytest.raises(XlpeftValueError, match="`intrinsic_dim` can be 1..4096"):
        IntrinsicPromptConfig(intrinsic_dim=0)
    with pytest.raises(XlpeftValueError, match="at most 33,554,432: lower prompt_length or decoder_hidden"):
        am.add_adapter("big", IntrinsicPromptConfig(prompt_length=4096, decoder_hidden=65536))
    assert "big" not in am.configs
    assert preset("intrinsic-prompt") == IntrinsicPromptConfig(prompt_length=10, intrinsic_dim=5)
