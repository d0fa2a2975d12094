"""DoRA, VeRA, LoHa and LoKr: golden equality with HF PEFT, merge, routing, gradients, files.

Each PEFT model is built with random (non-identity) adapter weights
(``init_*=False`` and a perturbed DoRA magnitude); the same tensors are copied
into xlpeft's adapter, and the test first checks that the adapter changes the
backbone's outputs, so a silently skipped copy cannot pass.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import FFN, HIDDEN, LAYERS, perturb, run, tiny_batch, tiny_model

from xlpeft import AdaptedModel
from xlpeft.errors import XlpeftTypeError, XlpeftValueError
from xlpeft.methods import DoRAConfig, LoHaConfig, LoKrConfig, VeRAConfig, preset
from xlpeft.methods.lokr import factorization

peft = pytest.importorskip("peft")

TARGETS = ("q", "v", "ffn_up")
PEFT_TARGETS = ["query", "value", "intermediate.dense"]
TOL = 1e-5

# (id, xlpeft config, PEFT config, {xlpeft param: PEFT param at the same linear})
CASES = {
    "dora": (DoRAConfig(r=4, alpha=8, targets=TARGETS),
             lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                     target_modules=PEFT_TARGETS),
             {"lora_A.weight": "lora_A.default.weight", "lora_B.weight": "lora_B.default.weight",
              "magnitude": "lora_magnitude_vector.default.weight"}),
    "vera": (VeRAConfig(r=8, targets=TARGETS),
             lambda: peft.VeraConfig(r=8, init_weights=False, target_modules=PEFT_TARGETS),
             {"vera_lambda_d": "vera_lambda_d.default", "vera_lambda_b": "vera_lambda_b.default"}),
    "loha": (LoHaConfig(r=4, alpha=6, targets=TARGETS),
             lambda: peft.LoHaConfig(r=4, alpha=6, init_weights=False, target_modules=PEFT_TARGETS),
             {f"hada_w{i}_{s}": f"hada_w{i}_{s}.default" for i in (1, 2) for s in "ab"}),
    "lokr": (LoKrConfig(r=2, alpha=3, targets=TARGETS),  # r < max(k, n)/2: W2 = W2a·W2b
             lambda: peft.LoKrConfig(r=2, alpha=3, init_weights=False, target_modules=PEFT_TARGETS),
             {"lokr_w1": "lokr_w1.default", "lokr_w2_a": "lokr_w2_a.default", "lokr_w2_b": "lokr_w2_b.default"}),
    "lokr-both": (LoKrConfig(r=1, alpha=2, decompose_both=True, targets=TARGETS),  # W1 = W1a·W1b too
                  lambda: peft.LoKrConfig(r=1, alpha=2, decompose_both=True, init_weights=False,
                                          target_modules=PEFT_TARGETS),
                  {f"lokr_w{i}_{s}": f"lokr_w{i}_{s}.default" for i in (1, 2) for s in "ab"}),
}
METHODS = list(CASES)


def _backbone() -> torch.nn.Module:
    """The tiny BERT with non-zero linear biases (HF initialises them to zero; DoRA subtracts them)."""
    model = tiny_model("bert", "masked-lm")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _peft_model(case: str, dropout: float = 0.0):
    torch.manual_seed(3)  # PEFT draws its random adapter weights from the global generator
    config = CASES[case][1]()
    if dropout:
        config = dataclasses.replace(config, **{"lora_dropout" if case == "dora" else "vera_dropout": dropout})
    model = peft.get_peft_model(_backbone(), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:  # PEFT sets m = ‖W + sBA‖: move it off that
                p.mul_(1 + 0.5 * torch.rand(p.shape))
            if name.split(".")[-2].startswith(("hada_", "lokr_")):  # products of small Kaiming draws: make them visible
                p.mul_(2)
    return model


def _copy_from_peft(am: AdaptedModel, name: str, peft_model, case: str) -> None:
    """Copy PEFT's tensors into adapter ``name``, linear by linear (matched by module name)."""
    names = {id(m): n for n, m in am.model.named_modules()}
    inner = peft_model.base_model.model
    tensors = {}
    for place, point in am.adapter_places(name).items():
        layer = inner.get_submodule(names[id(point.linear)])
        theirs = dict(layer.named_parameters())
        for ours, key in CASES[case][2].items():
            tensors[f"{place}.{ours}"] = theirs[key].detach().clone()
    if case == "vera":
        tensors["shared.vera.vera_A"] = peft_model.base_model.vera_A["default"].clone()
        tensors["shared.vera.vera_B"] = peft_model.base_model.vera_B["default"].clone()
    am.load_adapter_state_dict(name, tensors)


def _adapted(case: str, names=("a",), seed: int = 0) -> AdaptedModel:
    am = AdaptedModel(_backbone())
    for i, name in enumerate(names):
        am.add_adapter(name, CASES[case][0])
        perturb(am, name, scale=0.3, seed=seed + i)
    return am


@pytest.mark.parametrize("case", METHODS)
def test_outputs_equal_peft_for_identical_weights(case: str) -> None:
    theirs = _peft_model(case)
    batch = tiny_batch(theirs)
    expected = run(theirs, batch)
    with theirs.disable_adapter():
        bare = run(theirs, batch)
    assert (expected - bare).abs().max() > 1e-2, "the PEFT adapter must change the outputs"
    am = AdaptedModel(_backbone())
    am.add_adapter("a", CASES[case][0], set_active=True)
    _copy_from_peft(am, "a", theirs, case)
    got = run(am, batch)
    assert (got - expected).abs().max() <= TOL


def test_vera_projections_are_peft_s_for_the_same_seed() -> None:
    theirs = _peft_model("vera")
    am = AdaptedModel(_backbone())
    am.add_adapter("a", VeRAConfig(r=8, targets=TARGETS))
    shared = am.shared["a"]["vera"]
    assert tuple(shared.vera_B.shape) == (FFN, 8)  # grown to the largest target (ffn_up: 32 → 64)
    assert torch.equal(shared.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, theirs.base_model.vera_B["default"])


@pytest.mark.parametrize("case", METHODS)
def test_new_adapter_is_the_identity(case: str) -> None:
    am = AdaptedModel(_backbone())
    batch = tiny_batch(am.model)
    bare = run(am, batch)
    am.add_adapter("a", CASES[case][0], set_active=True)
    assert torch.allclose(run(am, batch), bare, atol=1e-5)


@pytest.mark.parametrize("case", METHODS)
def test_merged_equals_unmerged(case: str) -> None:
    am = _adapted(case)
    am.set_active("a")
    batch = tiny_batch(am.model)
    bare_weight = am.model.bert.encoder.layer[0].attention.self.query.weight.clone()
    unmerged = run(am, batch)
    am.merge("a")
    assert not torch.equal(am.model.bert.encoder.layer[0].attention.self.query.weight, bare_weight)
    assert (run(am, batch) - unmerged).abs().max() <= TOL
    am.unmerge("a")
    assert torch.equal(am.model.bert.encoder.layer[0].attention.self.query.weight, bare_weight)
    assert (run(am, batch) - unmerged).abs().max() <= TOL


@pytest.mark.parametrize("case", METHODS)
def test_mixed_batch_equals_each_adapter_alone(case: str) -> None:
    am = _adapted(case, ("a", "b"))
    batch = tiny_batch(am.model)
    plan = ["a", "b", "b", "a"]
    mixed = run(am, batch, adapters=plan)
    for name in ("a", "b"):
        am.set_active(name)
        alone = run(am, batch)
        rows = [i for i, n in enumerate(plan) if n == name]
        assert (mixed[rows] - alone[rows]).abs().max() <= TOL
    assert (run(am, batch, adapters=["a"] * 4) - run(am, batch, adapters=["b"] * 4)).abs().max() > 1e-3


@pytest.mark.parametrize("case", METHODS)
def test_only_the_chosen_adapter_gets_gradients(case: str) -> None:
    am = _adapted(case, ("a", "b"))
    am.train_adapters("a")
    am.set_active("a")
    run_out = am(**tiny_batch(am.model))["logits"]
    run_out.square().mean().backward()
    a = [p for m in am.adapter_modules("a") for p in m.parameters()]
    b = [p for m in am.adapter_modules("b") for p in m.parameters()]
    assert a and all(p.grad is not None and p.grad.abs().sum() > 0 for p in a)
    assert all(p.grad is None and not p.requires_grad for p in b)
    assert all(p.grad is None for p in am.model.parameters())
    if case == "vera":  # the shared projections are buffers: never trained
        assert not list(am.shared["a"].parameters())


@pytest.mark.parametrize("case", METHODS)
def test_save_load_round_trip(case: str, tmp_path) -> None:
    am = _adapted(case)
    am.set_active("a")
    batch = tiny_batch(am.model)
    expected = run(am, batch)
    am.save_adapter("a", str(tmp_path / "a"))
    fresh = AdaptedModel(_backbone())
    fresh.load_adapter(str(tmp_path / "a"), set_active=True)
    assert (run(fresh, batch) - expected).abs().max() == 0
    assert type(fresh.configs["a"]) is type(CASES[case][0])


def test_dora_initialize_adapters_restores_the_identity() -> None:
    am = _adapted("dora")
    am.set_active("a")
    batch = tiny_batch(am.model)
    with am.disable_adapters():
        bare = run(am, batch)
    assert (run(am, batch) - bare).abs().max() > 1e-2
    am.initialize_adapters()
    assert torch.allclose(run(am, batch), bare, atol=1e-5)


def test_dora_after_a_merged_adapter_uses_the_current_weight() -> None:
    am = _adapted("dora", ("d",))
    am.add_adapter("l", LoHaConfig(r=2, targets=("q",)))
    perturb(am, "l", seed=7)
    am.set_active("l")
    am.merge("l")
    from xlpeft import Stack
    am.set_active(Stack("l", "d"))
    batch = tiny_batch(am.model)
    unmerged = run(am, batch)
    am.merge("d")
    assert (run(am, batch) - unmerged).abs().max() <= TOL


def _count(am: AdaptedModel, name: str) -> int:
    return sum(p.numel() for m in am.adapter_modules(name) for p in m.parameters())


def test_parameter_counts_follow_the_formulas() -> None:
    am = AdaptedModel(_backbone())
    shapes = [(HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, FFN)] * LAYERS  # (in, out) of q, v, ffn_up
    am.add_adapter("dora", DoRAConfig(r=4, targets=TARGETS))
    assert _count(am, "dora") == sum(4 * (i + o) + o for i, o in shapes)
    am.add_adapter("vera", VeRAConfig(r=8, targets=TARGETS))
    assert _count(am, "vera") == sum(8 + o for _, o in shapes)
    assert sum(b.numel() for b in am.shared["vera"].buffers()) == 8 * HIDDEN + FFN * 8  # once per adapter
    am.add_adapter("loha", LoHaConfig(r=4, targets=TARGETS))
    assert _count(am, "loha") == sum(2 * 4 * (i + o) for i, o in shapes)
    am.add_adapter("lokr", LoKrConfig(r=2, targets=TARGETS))

    def lokr(i: int, o: int) -> int:
        (m, n), (l, k) = factorization(i), factorization(o)
        return l * m + 2 * (k + n)  # full W1, rank-2 W2
    assert _count(am, "lokr") == sum(lokr(i, o) for i, o in shapes)


def test_presets_build_peft_defaults() -> None:
    assert preset("dora") == DoRAConfig(r=8, alpha=16)
    assert preset("vera").r == 256 and preset("vera").d_initial == 0.1
    assert preset("loha") == LoHaConfig(r=8, alpha=8)
    assert preset("lokr") == LoKrConfig(r=8, alpha=8)


def test_factorization_matches_peft() -> None:
    from peft.tuners.lokr.layer import factorization as theirs
    for dim in (1, 7, 32, 64, 96, 127, 128, 768, 3072):
        for factor in (-1, 2, 4, 5, 16):
            assert factorization(dim, factor) == theirs(dim, factor), (dim, factor)


@pytest.mark.parametrize("config, field_name", [
    (DoRAConfig, "r"), (VeRAConfig, "r"), (LoHaConfig, "r"), (LoKrConfig, "r"),
    (DoRAConfig, "alpha"), (LoHaConfig, "alpha"), (LoKrConfig, "alpha"),
])
def test_config_checks(config, field_name: str) -> None:
    with pytest.raises(XlpeftValueError, match=f"`{field_name}` must be > 0; got 0"):
        config(**{field_name: 0})
    with pytest.raises(XlpeftTypeError, match=f"`{field_name}` can be"):
        config(**{field_name: "2"})


def test_config_checks_of_single_fields() -> None:
    with pytest.raises(XlpeftValueError, match=r"`dropout` must be in \[0, 1\); got 1"):
        DoRAConfig(dropout=1.0)
    with pytest.raises(XlpeftValueError, match=r"`dropout` must be in \[0, 1\)"):
        VeRAConfig(dropout=-0.1)
    with pytest.raises(XlpeftValueError, match="`decompose_factor` can be -1"):
        LoKrConfig(decompose_factor=0)
    with pytest.raises(XlpeftValueError, match="`projection_seed` can be 0.."):
        VeRAConfig(projection_seed=-1)
    with pytest.raises(XlpeftValueError, match="`target_patterns` can be regular expressions"):
        LoHaConfig(target_patterns=("(",))
    with pytest.raises(XlpeftTypeError, match="`decompose_both` can be true or false"):
        LoKrConfig(decompose_both=1)


@pytest.mark.parametrize("config, why", [
    (DoRAConfig(r=HIDDEN + 1), r"at most min\(in, out\)"),
    (LoHaConfig(r=HIDDEN + 1), r"at most min\(in, out\)"),
    (LoKrConfig(r=HIDDEN + 1), r"at most min\(in, out\)"),
    (VeRAConfig(r=HIDDEN + 1), r"at most max\(in, out\) wide"),
])
def test_rank_bound_refused_before_allocation_and_model_unchanged(config, why: str) -> None:
    am = AdaptedModel(_backbone())
    before = {k: v.clone() for k, v in am.state_dict().items()}
    with pytest.raises(XlpeftValueError, match=f"`r` can be 1..{HIDDEN} .*{why}"):
        am.add_adapter("a", config)
    assert "a" not in am.configs and not am.shared
    after = am.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_configs_round_trip_through_dicts() -> None:
    from xlpeft.methods import config_from_dict
    for config in (DoRAConfig(r=3), VeRAConfig(r=5, projection_seed=9), LoHaConfig(alpha=2.5),
                   LoKrConfig(decompose_both=True, decompose_factor=4)):
        assert config_from_dict(config.to_dict()) == config
        assert dataclasses.replace(config) == config


@pytest.mark.parametrize("case", METHODS)
def test_merged_weights_equal_peft_merge_and_unload(case: str) -> None:
    theirs = _peft_model(case)
    am = AdaptedModel(_backbone())
    am.add_adapter("a", CASES[case][0], set_active=True)
    _copy_from_peft(am, "a", theirs, case)
    am.merge("a")
    merged = theirs.merge_and_unload().state_dict()
    ours = am.model.state_dict()
    changed = [k for k in ours if k.endswith(("query.weight", "value.weight", "intermediate.dense.weight"))]
    assert len(changed) == 3 * LAYERS
    for key in changed:
        assert (ours[key] - merged[key]).abs().max() <= TOL, key


def test_dora_deep_copy_reads_the_copied_weight() -> None:
    import copy
    am = _adapted("dora")
    am.set_active("a")
    batch = tiny_batch(am.model)
    expected = run(am, batch)
    twin = copy.deepcopy(am)
    with torch.no_grad():
        am.model.bert.encoder.layer[0].attention.self.query.weight.mul_(2)  # the original only
    assert (run(twin, batch) - expected).abs().max() == 0
    module = next(iter(twin.adapter_modules("a")))
    assert module.linear is twin.model.bert.encoder.layer[0].attention.self.query


@pytest.mark.parametrize("case", ["dora", "vera"])
def test_training_forward_with_dropout_equals_peft(case: str) -> None:
    """Input dropout in training: the same mask (same RNG draws, in the same order) gives PEFT's output."""
    theirs = _peft_model(case, dropout=0.3).train()
    batch = tiny_batch(theirs)
    am = AdaptedModel(_backbone())
    am.add_adapter("a", CASES[case][0].replace(dropout=0.3), set_active=True)
    _copy_from_peft(am, "a", theirs, case)
    am.train()
    torch.manual_seed(11)
    expected = theirs(**batch).logits
    torch.manual_seed(11)
    got = am(**batch).logits
    torch.manual_seed(12)
    other = am(**batch).logits
    assert (got - expected).abs().max() <= TOL
    assert (other - got).abs().max() > 1e-3  # dropout is on: another draw differs


@pytest.mark.parametrize("case", METHODS)
def test_initialize_adapters_gives_new_identity_adapters(case: str) -> None:
    am = _adapted(case)
    am.set_active("a")
    batch = tiny_batch(am.model)
    with am.disable_adapters():
        bare = run(am, batch)
    projections = {k: v.clone() for k, v in am.adapter_state_dict("a").items() if k.startswith("shared.")}
    am.initialize_adapters()
    assert torch.allclose(run(am, batch), bare, atol=1e-5)
    after = am.adapter_state_dict("a")
    assert all(torch.equal(after[k], v) for k, v in projections.items())  # VeRA's seeded pair, regrown


@pytest.mark.parametrize("case", METHODS)
def test_pickled_model_gives_the_same_outputs(case: str) -> None:
    import pickle
    am = _adapted(case)
    am.set_active("a")
    batch = tiny_batch(am.model)
    twin = pickle.loads(pickle.dumps(am))
    assert (run(twin, batch) - run(am, batch)).abs().max() == 0
    twin.merge("a")  # DoRA's bound linear and VeRA's shared pair came along with the copy
    assert (run(twin, batch) - run(am, batch)).abs().max() <= TOL
