"""``xlpeft.ops.arithmetic``: combinations, analogies, TIES and DARE against hand-computed tensors."""

from __future__ import annotations

import pytest
import torch

from tiny import tiny_batch, tiny_model
from xlpeft.core.composition import Stack
from xlpeft.core.model import AdaptedModel
from xlpeft.errors import XlpeftKeyError, XlpeftValueError
from xlpeft.methods.bottleneck import BottleneckConfig
from xlpeft.methods.ia3 import IA3Config
from xlpeft.methods.lora import LoRAConfig
from xlpeft.ops import arithmetic
from xlpeft.ops.arithmetic import analogy, combine, dare, dare_vectors, task_vector, ties, ties_vectors

BOTTLENECK = BottleneckConfig(reduction_factor=4)


def _model(config, names=("a", "b", "c")) -> AdaptedModel:
    model = AdaptedModel(tiny_model("bert"))
    for i, name in enumerate(names):
        model.add_adapter(name, config)
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for module in model.adapter_modules(name):
                for p in module.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def _states(model: AdaptedModel, *names: str) -> list[dict[str, torch.Tensor]]:
    return [model.adapter_state_dict(n) for n in names]


def _deltas(model: AdaptedModel, name: str) -> dict[str, torch.Tensor]:
    """Place → s·B·A of a LoRA adapter, from its state dict and config."""
    state, config = model.adapter_state_dict(name), model.configs[name]
    places = {k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}
    s = config.alpha / config.r
    return {p: s * state[f"{p}.lora_B.weight"] @ state[f"{p}.lora_A.weight"] for p in places}


def test_combine_bottleneck_is_the_linear_combination_of_parameters() -> None:
    model = _model(BOTTLENECK)
    combine(model, "mix", {"a": 0.5, "b": -1.5, "c": 2.0})
    a, b, c, mix = _states(model, "a", "b", "c", "mix")
    assert mix.keys() == a.keys()
    for key in a:
        torch.testing.assert_close(mix[key], 0.5 * a[key] - 1.5 * b[key] + 2.0 * c[key])


def test_analogy_is_a_plus_lambda_b_minus_c() -> None:
    model = _model(BOTTLENECK)
    analogy(model, "new", "a", "b", "c", scale=0.7)
    a, b, c, new = _states(model, "a", "b", "c", "new")
    for key in a:
        torch.testing.assert_close(new[key], a[key] + 0.7 * (b[key] - c[key]))
    assert not torch.equal(new[next(iter(a))], a[next(iter(a))])


def test_ia3_task_vectors_are_relative_to_the_unit_scale() -> None:
    model = _model(IA3Config(), names=("a", "b"))
    combine(model, "mix", {"a": 2.0, "b": 1.0})  # coefficients sum to 3: the identity matters
    a, b, mix = _states(model, "a", "b", "mix")
    for key in a:
        torch.testing.assert_close(mix[key], 1 + 2.0 * (a[key] - 1) + (b[key] - 1))
        assert not torch.allclose(mix[key], 2.0 * a[key] + b[key])


def test_lora_factor_space_combines_a_and_b_separately() -> None:
    model = _model(LoRAConfig(r=2), names=("a", "b"))
    combine(model, "soup", {"a": 0.5, "b": 0.5})
    a, b, soup = _states(model, "a", "b", "soup")
    for key in a:
        torch.testing.assert_close(soup[key], 0.5 * a[key] + 0.5 * b[key])
    place = next(iter(_deltas(model, "a")))
    averaged_update = 0.5 * _deltas(model, "a")[place] + 0.5 * _deltas(model, "b")[place]
    assert not torch.allclose(_deltas(model, "soup")[place], averaged_update, atol=1e-4)  # why `delta` exists


def test_lora_delta_space_is_exact_with_concatenated_factors() -> None:
    model = _model(LoRAConfig(r=2, alpha=6), names=("a", "b", "c"))
    analogy(model, "new", "a", "b", "c", scale=0.5, space="delta")
    assert model.configs["new"].r == 6 and model.configs["new"].alpha / 6 == pytest.approx(3.0)
    da, db, dc, new = (_deltas(model, n) for n in ("a", "b", "c", "new"))
    for place in da:
        torch.testing.assert_close(new[place], da[place] + 0.5 * (db[place] - dc[place]), rtol=1e-5, atol=1e-6)


def test_lora_delta_space_truncated_svd() -> None:
    model = _model(LoRAConfig(r=2), names=("a", "b"))
    combine(model, "full", {"a": 1.0, "b": -0.5}, space="delta", rank=4)  # rank of the sum ≤ 4: exact
    combine(model, "low", {"a": 1.0, "b": -0.5}, space="delta", rank=1)
    da, db, full, low = (_deltas(model, n) for n in ("a", "b", "full", "low"))
    assert model.configs["low"].r == 1
    for place in da:
        target = da[place] - 0.5 * db[place]
        torch.testing.assert_close(full[place], target, rtol=1e-4, atol=1e-5)
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        torch.testing.assert_close(low[place], s[0] * torch.outer(u[:, 0], vh[0]), rtol=1e-4, atol=1e-5)
        assert torch.linalg.matrix_rank(low[place]) == 1


def test_ties_on_a_hand_written_example() -> None:
    t1 = {"u": torch.tensor([0.05, 0.2]), "w": torch.tensor([0.5, -0.1, 0.3, -0.8])}
    t2 = {"u": torch.tensor([0.7, -0.02]), "w": torch.tensor([-0.4, 0.2, 0.1, -0.6])}
    # density 0.5 keeps 3 of 6 entries per vector, over both tensors together:
    #   t1 → w [0.5, 0, 0.3, -0.8], u [0, 0];  t2 → w [-0.4, 0, 0, -0.6], u [0.7, 0]
    # elected signs (sum): w [+, 0, +, −], u [+, 0]; mean over the agreeing entries:
    out = ties_vectors([t1, t2], density=0.5, weights=[1.0, 1.0])
    torch.testing.assert_close(out["w"], torch.tensor([0.5, 0.0, 0.3, -0.7]))
    torch.testing.assert_close(out["u"], torch.tensor([0.7, 0.0]))
    # weights scale the trimmed vectors before the election: 3·t2 outvotes t1 at w[0]
    out = ties_vectors([t1, t2], density=0.5, weights=[1.0, 3.0])
    torch.testing.assert_close(out["w"], torch.tensor([-1.2, 0.0, 0.3, -1.3]))


def test_ties_on_adapters_is_identity_plus_scaled_merged_task_vector() -> None:
    model = _model(IA3Config(), names=("a", "b"))
    ties(model, "merged", ["a", "b"], density=0.3, scale=0.8)
    vectors = [task_vector(s) for s in _states(model, "a", "b")]
    expected = ties_vectors(vectors, 0.3, [1.0, 1.0])
    merged = model.adapter_state_dict("merged")
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], 1 + 0.8 * value)
    kept = sum(int((v != 0).sum()) for v in expected.values())
    assert 0 < kept < sum(v.numel() for v in expected.values())


def test_dare_drops_and_rescales_with_a_seeded_generator() -> None:
    model = _model(BOTTLENECK, names=("a", "b"))
    dare(model, "d", ["a", "b"], drop=0.4, weights=[0.5, 0.5], seed=7)
    a, b, d = _states(model, "a", "b", "d")
    gen = torch.Generator().manual_seed(7)  # the documented draw order: vector, then sorted keys
    expected = {k: torch.zeros_like(a[k]) for k in a}
    for state in (a, b):
        for key in sorted(a):
            kept = torch.rand(a[key].shape, generator=gen) >= 0.4
            expected[key] += 0.5 * state[key] * kept / 0.6
    for key in a:
        torch.testing.assert_close(d[key], expected[key])
    dare(model, "again", ["a", "b"], drop=0.4, weights=[0.5, 0.5], seed=7)
    dare(model, "other", ["a", "b"], drop=0.4, weights=[0.5, 0.5], seed=8)
    again, other = _states(model, "again", "other")
    assert all(torch.equal(again[k], d[k]) for k in a)
    assert not all(torch.equal(other[k], d[k]) for k in a)


def test_dare_single_vector_entries_are_zero_or_rescaled() -> None:
    tau = {"w": torch.randn(4000, generator=torch.Generator().manual_seed(0))}
    out = dare_vectors([tau], drop=0.5, weights=[1.0], generator=torch.Generator().manual_seed(1))["w"]
    dropped = out == 0
    assert 0.45 < float(dropped.float().mean()) < 0.55
    torch.testing.assert_close(out[~dropped], 2 * tau["w"][~dropped])


def test_dare_without_drop_equals_combine() -> None:
    model = _model(BOTTLENECK, names=("a", "b"))
    dare(model, "d", ["a", "b"], drop=0.0, weights=[0.3, 0.9])
    combine(model, "c", {"a": 0.3, "b": 0.9})
    d, c = _states(model, "d", "c")
    for key in d:
        torch.testing.assert_close(d[key], c[key])


def test_average_state_dicts_lives_in_arithmetic() -> None:
    model = _model(BOTTLENECK, names=("a", "b"))
    model.average_adapters("soup", ["a", "b"], weights=[1.0, 3.0])
    a, b, soup = _states(model, "a", "b", "soup")
    for key in a:
        torch.testing.assert_close(soup[key], 0.25 * a[key] + 0.75 * b[key])
    assert arithmetic.average_state_dicts([a, b])[key].shape == a[key].shape


def test_errors_leave_the_model_unchanged() -> None:
    model = _model(LoRAConfig(r=16), names=("a", "b", "c"))
    model.add_adapter("bn", BOTTLENECK)
    names, points = model.adapter_names, {k: list(p.adapters) for k, p in model.points.items()}
    with pytest.raises(XlpeftValueError, match="different configs"):
        combine(model, "x", {"a": 1.0, "bn": 1.0})
    with pytest.raises(XlpeftValueError, match="already exists"):
        combine(model, "b", {"a": 1.0, "c": 1.0})
    with pytest.raises(XlpeftKeyError, match="unknown adapter 'zz'"):
        analogy(model, "x", "a", "zz", "c")
    with pytest.raises(XlpeftValueError, match="space='delta' can combine non-gated LoRA"):
        combine(model, "x", {"bn": 1.0}, space="delta")
    with pytest.raises(XlpeftValueError, match="TIES and DARE give full-rank updates"):
        ties(model, "x", ["a", "b"], space="delta")
    with pytest.raises(XlpeftValueError, match="`density` can be a number in"):
        ties(model, "x", ["a", "b"], density=0)
    with pytest.raises(XlpeftValueError, match="`drop` can be a probability"):
        dare(model, "x", ["a", "b"], drop=1.0)
    with pytest.raises(XlpeftValueError, match="`space` can be factors, delta"):
        combine(model, "x", {"a": 1.0}, space="updates")
    with pytest.raises(XlpeftValueError, match="`coefficients` can be 2 finite"):
        combine(model, "x", {"a": 1.0, "b": float("nan")})
    with pytest.raises(XlpeftValueError, match="`r`"):  # 3 × 16 > 32, the rank a 32→32 linear allows
        combine(model, "x", {"a": 1.0, "b": 1.0, "c": 1.0}, space="delta")
    assert model.adapter_names == names
    assert {k: list(p.adapters) for k, p in model.points.items()} == points


def test_delta_sum_acts_like_stacking_the_loras() -> None:
    model = _model(LoRAConfig(r=2, targets=("q", "v", "ffn_up")), names=("a", "b"))
    combine(model, "sum", {"a": 1.0, "b": 1.0}, space="delta")
    batch = tiny_batch(model.model)
    with torch.no_grad():
        model.set_active(Stack("a", "b"))
        stacked = model(**batch).last_hidden_state
        model.set_active("sum")
        summed = model(**batch).last_hidden_state
        model.set_active("a")
        alone = model(**batch).last_hidden_state
    torch.testing.assert_close(summed, stacked, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone, stacked, atol=1e-3)


def test_factor_space_uses_masked_values_and_unites_masks() -> None:
    model = _model(LoRAConfig(r=2), names=("a", "b"))
    point = next(p for p in model.points.values() if "a" in p.adapters)
    shape = point.adapters["a"].lora_A.weight.shape
    mask_a, mask_b = torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)
    mask_a[0], mask_b[:, 0] = True, True
    point.adapters["a"].lora_A.set_mask(mask_a)
    point.adapters["b"].lora_A.set_mask(mask_b)
    with torch.no_grad():
        point.adapters["a"].lora_A.weight.add_(1.0)  # pruned entries drift: they must not count
    wa, wb = point.adapters["a"].lora_A.weight.clone(), point.adapters["b"].lora_A.weight.clone()
    combine(model, "mix", {"a": 0.5, "b": 2.0})
    mixed = point.adapters["mix"].lora_A
    assert torch.equal(mixed.weight_mask, mask_a | mask_b)
    torch.testing.assert_close(mixed.weight, 0.5 * wa * mask_a + 2.0 * wb * mask_b)
