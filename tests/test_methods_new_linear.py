"""The linear-point methods of issue 15: KronA, Intrinsic SAID, FAR and AdaMix's LoRA mix.

Shared checks, each with non-identity weights (``perturb``) so it can fail:
merged == unmerged, a mixed routed batch == each group alone, save → load
gives identical outputs, only the chosen adapter gets gradients, and the
parameter count equals the paper's formula. Method-specific golden values
(KronA against PEFT's LoKr with full factors and a dense ``A ⊗ B``) follow.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import FFN, HIDDEN, LAYERS, perturb, run, tiny_batch, tiny_model

from xlpeft import AdaptedModel
from xlpeft.errors import XlpeftTypeError, XlpeftValueError
from xlpeft.methods import AdaMixConfig, FARConfig, KronAConfig, SAIDConfig, config_from_dict, preset
from xlpeft.methods.said import Fastfood, fwht
from xlpeft.methods.lokr import factorization

TARGETS = ("q", "v", "ffn_up")
SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, FFN)] * LAYERS  # (in, out) of q, v, ffn_up
TOL = 1e-5


def _krona_count() -> int:
    def one(i: int, o: int) -> int:
        (a_o, _), (a_i, _) = factorization(o), factorization(i)
        return a_o * a_i + (o // a_o) * (i // a_i)
    return sum(one(i, o) for i, o in SHAPES)


# id → (config, trainable parameters by the paper's formula)
CASES = {
    "krona": (KronAConfig(targets=TARGETS, scaling=2.0), _krona_count()),
    "adamix-lora": (AdaMixConfig(kind="lora", num_experts=3, r=4, targets=TARGETS),  # E·r·(in + out)
                    sum(3 * 4 * (i + o) for i, o in SHAPES)),
    "far": (FARConfig(targets=TARGETS, fraction=0.25), sum(o // 4 * (i + 1) for i, o in SHAPES)),  # |S|·(in+1)
    "said": (SAIDConfig(intrinsic_dim=50, targets=TARGETS, seed=3), 50 + len(SHAPES)),  # d + m
}
METHODS = list(CASES)


def _adapted(case: str, names=("a",), seed: int = 0) -> AdaptedModel:
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    for i, name in enumerate(names):
        am.add_adapter(name, CASES[case][0])
        perturb(am, name, scale=0.3, seed=seed + i)
    return am.eval()  # AdaMix: the averaged (inference) experts


@pytest.mark.parametrize("case", METHODS)
def test_new_adapter_is_the_identity(case: str) -> None:
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    batch = tiny_batch(am.model)
    bare = run(am, batch)
    am.add_adapter("a", CASES[case][0], set_active=True)
    assert torch.allclose(run(am, batch), bare, atol=1e-6)


@pytest.mark.parametrize("case", METHODS)
def test_merged_equals_unmerged(case: str) -> None:
    am = _adapted(case)
    am.set_active("a")
    batch = tiny_batch(am.model)
    with am.disable_adapters():
        bare = run(am, batch)
    query = am.model.bert.encoder.layer[0].attention.self.query
    before = query.weight.clone()
    unmerged = run(am, batch)
    assert (unmerged - bare).abs().max() > 1e-2, "the adapter must change the outputs"
    am.merge("a")
    assert not torch.equal(query.weight, before)
    assert (run(am, batch) - unmerged).abs().max() <= TOL
    am.unmerge("a")
    assert torch.equal(query.weight, before)


@pytest.mark.parametrize("case", METHODS)
def test_mixed_batch_equals_each_adapter_alone(case: str) -> None:
    am = _adapted(case, ("a", "b"))
    batch = tiny_batch(am.model)
    plan = ["a", "b", "b", "a"]
    mixed = run(am, batch, adapters=plan)
    for name in ("a", "b"):
        am.set_active(name)
        rows = [i for i, n in enumerate(plan) if n == name]
        assert (mixed[rows] - run(am, batch)[rows]).abs().max() <= TOL
    assert (run(am, batch, adapters=["a"] * 4) - run(am, batch, adapters=["b"] * 4)).abs().max() > 1e-3


@pytest.mark.parametrize("case", METHODS)
def test_only_the_chosen_adapter_gets_gradients(case: str) -> None:
    am = _adapted(case, ("a", "b"))
    am.train_adapters("a")
    am.set_active("a")
    am(**tiny_batch(am.model))["logits"].square().mean().backward()
    a = [p for m in am.adapter_modules("a") for p in m.parameters()]
    b = [p for m in am.adapter_modules("b") for p in m.parameters()]
    assert a and all(p.grad is not None and p.grad.abs().sum() > 0 for p in a)
    assert all(p.grad is None and not p.requires_grad for p in b)
    assert all(p.grad is None for p in am.model.parameters())


@pytest.mark.parametrize("case", METHODS)
def test_save_load_round_trip(case: str, tmp_path) -> None:
    am = _adapted(case)
    am.set_active("a")
    batch = tiny_batch(am.model)
    expected = run(am, batch)
    am.save_adapter("a", str(tmp_path / "a"))
    fresh = AdaptedModel(tiny_model("bert", "masked-lm"))
    fresh.load_adapter(str(tmp_path / "a"), set_active=True)
    assert (run(fresh.eval(), batch) - expected).abs().max() == 0
    assert fresh.configs["a"] == CASES[case][0]
    assert config_from_dict(CASES[case][0].to_dict()) == CASES[case][0]


@pytest.mark.parametrize("case", METHODS)
def test_parameter_count_follows_the_formula(case: str) -> None:
    am = _adapted(case)
    assert sum(p.numel() for m in am.adapter_modules("a") for p in m.parameters()) == CASES[case][1]


# --------------------------------------------------------------------------- KronA
def test_krona_equals_a_dense_kronecker_update() -> None:
    am = _adapted("krona")
    module = am.points["encoder-0-attention-self-query"].adapters["a"]
    x = torch.randn(3, 5, HIDDEN)
    y = torch.randn(3, 5, HIDDEN)
    dense = y + F.linear(x, 2.0 * torch.kron(module.krona_A, module.krona_B))
    assert (module(x, y) - dense).abs().max() <= 1e-5
    assert (module(x, y) - y).abs().max() > 1e-2


def test_krona_equals_peft_lokr_with_full_factors() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    config = peft.LoKrConfig(r=64, alpha=128, init_weights=False,  # r ≥ max(k, n)/2: W2 full; s = α/r = 2
                             target_modules=["query", "value", "intermediate.dense"])
    theirs = peft.get_peft_model(tiny_model("bert", "masked-lm"), config).eval()
    batch = tiny_batch(theirs)
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    am.add_adapter("a", KronAConfig(targets=TARGETS, scaling=2.0), set_active=True)
    names = {id(m): n for n, m in am.model.named_modules()}
    tensors = {}
    for place, point in am.adapter_places("a").items():
        layer = theirs.base_model.model.get_submodule(names[id(point.linear)])
        tensors[f"{place}.krona_A"] = layer.lokr_w1["default"].detach().clone()
        tensors[f"{place}.krona_B"] = layer.lokr_w2["default"].detach().clone()
    am.load_adapter_state_dict("a", tensors)
    expected = run(theirs, batch)
    with theirs.disable_adapter():
        assert (expected - run(theirs, batch)).abs().max() > 1e-2
    assert (run(am, batch) - expected).abs().max() <= TOL


def test_krona_shapes_and_checks() -> None:
    assert KronAConfig(a_out=4, a_in=8).shapes(32, 64) == ((4, 8), (16, 4))
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    with pytest.raises(XlpeftValueError, match="`a_in` must divide the linear's size 32; got 5"):
        am.add_adapter("a", KronAConfig(a_in=5))
    assert "a" not in am.configs and not am.points
    with pytest.raises(XlpeftValueError, match="`a_out` can be -1"):
        KronAConfig(a_out=0)
    with pytest.raises(XlpeftTypeError, match="`scaling` can be a finite number"):
        KronAConfig(scaling="2")
    assert preset("krona") == KronAConfig(targets=("q", "v"))


# --------------------------------------------------------------------------- Intrinsic SAID
def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    return h


def test_fwht_equals_the_dense_sylvester_hadamard() -> None:
    x = torch.randn(3, 64, dtype=torch.float64)
    assert (fwht(x) - x @ _hadamard(64).double().t()).abs().max() <= 1e-10


def test_fastfood_equals_its_dense_matrix_by_hand() -> None:
    ff = Fastfood(5, 40, seed=7)  # padded to 64
    L = ff.padded
    assert L == 64
    pad = torch.eye(L)[:, :5]
    B = torch.diag(torch.where(ff.sign, 1.0, -1.0))
    Pi = torch.eye(L)[ff.perm.long()]  # (Πx)_i = x[perm_i]
    G = torch.diag(ff.gauss)
    H = _hadamard(L)
    dense = (H @ G @ Pi @ H @ B @ pad)[:40] / (torch.sqrt(L * ff.gauss.square().sum()) * (40 / L) ** 0.5)
    x = torch.randn(5)
    assert (ff(x) - dense @ x).abs().max() <= 1e-4
    assert (ff.dense() - dense).abs().max() <= 1e-4
    ff64 = Fastfood(5, 40, seed=7).double()
    assert torch.autograd.gradcheck(ff64, (torch.randn(5, dtype=torch.float64, requires_grad=True),))
    g = torch.randn(40)
    assert (ff.project_transposed(g) - dense.t() @ g).abs().max() <= 1e-4  # the backward is Vᵀ
    big = Fastfood(20, 3000, seed=1).dense()
    assert (big.norm(dim=0).mean() - 1).abs() < 0.1  # unit-norm columns on average


def test_said_delta_is_lambda_times_the_projection_and_factors_are_rebuilt_not_saved() -> None:
    am = _adapted("said")
    point = am.points["encoder-0-attention-self-query"]
    module = point.adapters["a"]
    d = am.shared["a"]["said"].said_d
    expected = module.said_lambda * (module.projection.dense() @ d).view(HIDDEN, HIDDEN)
    assert (module.delta_weight() - expected).abs().max() <= 1e-5
    keys = am.adapter_state_dict("a")
    assert "shared.said.said_d" in keys and len(keys) == 1 + len(SHAPES)  # d and the λ only
    other = AdaptedModel(tiny_model("bert", "masked-lm"))
    other.add_adapter("a", CASES["said"][0])
    twin = other.points["encoder-0-attention-self-query"].adapters["a"].projection
    assert torch.equal(twin.perm, module.projection.perm) and torch.equal(twin.gauss, module.projection.gauss)
    v = am.points["encoder-0-attention-self-value"].adapters["a"].projection
    assert not torch.equal(v.perm, module.projection.perm)  # each matrix its own projection
    with pytest.raises(XlpeftValueError, match="`intrinsic_dim` can be 1..1024"):
        AdaptedModel(tiny_model("bert")).add_adapter("x", SAIDConfig(intrinsic_dim=2000))
    assert preset("said").intrinsic_dim == 1000


# --------------------------------------------------------------------------- FAR
def test_far_changes_only_the_selected_rows_largest_first() -> None:
    am = _adapted("far")
    am.set_active("a")
    point = am.points["encoder-0-intermediate-dense"]
    module, linear = point.adapters["a"], point.linear
    norms = linear.weight.abs().sum(1)
    assert set(module.rows.tolist()) == set(norms.topk(FFN // 4).indices.tolist())
    x = torch.randn(2, 3, HIDDEN)
    y = linear(x)  # the hook adds the rows' update
    with am.disable_adapters():
        bare = linear(x)
    others = [r for r in range(FFN) if r not in set(module.rows.tolist())]
    assert torch.equal(y[..., others], bare[..., others])
    rows = module.rows
    expected = bare[..., rows] + x @ module.far_rows.t() + module.far_bias
    assert (y[..., rows] - expected).abs().max() <= 1e-5
    state = am.adapter_state_dict("a")
    assert tuple(state["encoder.0.intermediate.dense.far_rows"].shape) == (FFN // 4, HIDDEN)  # row-wise


def test_far_random_rows_are_seeded_and_bias_free_linears_are_named() -> None:
    am = AdaptedModel(tiny_model("bert"))
    am.add_adapter("a", FARConfig(select="random", seed=1))
    am.add_adapter("b", FARConfig(select="random", seed=1))
    am.add_adapter("c", FARConfig(select="random", seed=2))
    rows = {n: am.points["encoder-0-intermediate-dense"].adapters[n].rows.tolist() for n in "abc"}
    assert rows["a"] == rows["b"] != rows["c"]
    t5 = AdaptedModel(tiny_model("t5"))
    with pytest.raises(XlpeftValueError, match="FAR `bias=True` trains bias entries, but this linear has no bias"):
        t5.add_adapter("a", FARConfig())
    assert "a" not in t5.configs and not t5.points
    t5.add_adapter("a", FARConfig(bias=False))
    with pytest.raises(XlpeftValueError, match="`fraction` can be"):
        FARConfig(fraction=1.5)
    assert preset("far") == FARConfig(fraction=0.1)


@pytest.mark.parametrize("case", METHODS)
def test_bf16_backbone_keeps_its_dtype_with_float32_adapters(case: str) -> None:
    am = AdaptedModel(tiny_model("bert", "masked-lm").to(torch.bfloat16))
    am.add_adapter("a", CASES[case][0], set_active=True)
    perturb(am, "a")
    out = run(am.eval(), tiny_batch(am.model))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert all(p.dtype == torch.float32 for m in am.adapter_modules("a") for p in m.parameters())
    with am.disable_adapters():
        assert (run(am, tiny_batch(am.model)).float() - out.float()).abs().max() > 1e-2
