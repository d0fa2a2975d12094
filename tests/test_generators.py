"""Typology-conditioned generators: MAD-G, Hyper-X, typology averaging, materialising."""

from __future__ import annotations

import json

import pytest
import torch

from tiny import perturb, run, tiny_batch, tiny_model
from xlpeft import AdaptedModel, Stack
from xlpeft.errors import IncompatibleAdapterError, XlpeftKeyError, XlpeftValueError
from xlpeft.generators import (
    average_by_typology, build_generator, load_generator, save_generator, typology_weights,
)

SMALL = {"reduction_factor": 4, "language_dim": 8, "typology_hidden": 16}


def _model(family: str = "bert") -> AdaptedModel:
    return AdaptedModel(tiny_model(family, "masked-lm" if family == "bert" else "seq2seq"))


@torch.no_grad()
def _shake(gen, seed: int = 0) -> None:
    """Non-identity generator (up-projections start at zero)."""
    g = torch.Generator().manual_seed(seed)
    for p in gen.parameters():
        p.add_(0.3 * torch.randn(p.shape, generator=g))


def _gen(model: AdaptedModel, kind: str = "madg", **extra):
    fields = {**SMALL, **({"basis": 4} if kind == "madg" else {"tasks": ["mlm", "genre"]}), **extra}
    gen = build_generator(kind, model, **fields)
    _shake(gen)
    return gen


@pytest.mark.parametrize("kind", ["madg", "hyperx"])
def test_generation_is_deterministic_and_language_specific(kind):
    task = "" if kind == "madg" else "mlm"
    a, b = _gen(_model(), kind), _gen(_model(), kind)
    wa, wb = a.weights("swh", task), b.weights("swh", task)
    assert all(torch.equal(x, y) for x, y in zip(wa, wb))
    assert a.weights("swh", task) is wa  # cached
    other = a.weights("tgl", task)
    assert all(not torch.allclose(x, y) for x, y in zip(wa, other))
    fresh = build_generator(kind, _model(), **({**SMALL, "basis": 4} if kind == "madg" else SMALL))
    assert all(not p.any() for p in fresh.weights("eng", task)[2:]), "a new generator emits identity adapters"


def test_generated_adapters_route_per_example_and_stack():
    am = _model()
    gen = _gen(am)
    gen.attach(am, "swh"), gen.attach(am, "tgl")
    am.add_adapter("genre", "pfeiffer")
    perturb(am, "genre")
    batch = tiny_batch(am.model)
    swh, tgl, base = run(am, batch, adapters=["swh"] * 4), run(am, batch, adapters=["tgl"] * 4), run(am, batch)
    assert (swh - tgl).abs().max() > 1e-3 and (swh - base).abs().max() > 1e-3
    mixed = run(am, batch, adapters=["swh", "tgl", "tgl", "swh"])
    torch.testing.assert_close(mixed[[0, 3]], swh[[0, 3]])
    torch.testing.assert_close(mixed[[1, 2]], tgl[[1, 2]])
    stacked = run(am, batch, adapters=[Stack("swh", "genre")] * 4)
    assert (stacked - swh).abs().max() > 1e-3


def test_gradients_reach_the_generator_only_through_routed_languages():
    am = _model()
    gen = _gen(am)
    for lang in ("swh", "tgl"):
        gen.attach(am, lang)
    am.train_adapters("swh", "tgl").train()
    assert all(p.requires_grad for p in gen.parameters())
    assert not any(p.requires_grad for p in am.model.parameters())
    batch = tiny_batch(am.model)
    am(**batch, adapters=["swh", "tgl", "swh", "swh"]).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    # the backward consumed the cached weights: a second step recomputes them
    am(**batch, adapters=["swh"] * 4).logits.square().mean().backward()


def test_cache_follows_optimizer_steps():
    am = _model()
    gen = _gen(am)
    gen.attach(am, "swh")
    am.train_adapters("swh")
    batch = tiny_batch(am.model)
    before = run(am, batch, adapters=["swh"] * 4)
    opt = torch.optim.SGD(gen.parameters(), lr=0.5)
    am(**batch, adapters=["swh"] * 4).logits.square().mean().backward()
    opt.step()
    assert (run(am, batch, adapters=["swh"] * 4) - before).abs().max() > 1e-4


@pytest.mark.parametrize("kind, lang", [("madg", "swh"), ("madg", "quy"), ("hyperx", "nah")])
def test_materialised_adapter_equals_the_generator(kind, lang, tmp_path):
    am = _model()
    gen = _gen(am, kind)
    task = "" if kind == "madg" else "genre"
    name = gen.attach(am, lang, task)
    path = gen.materialise(lang, tmp_path / lang, task=task)
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["config"]["method"] == "bottleneck" and meta["generated"]["generator"] == kind
    static = am.load_adapter(str(path), name="static")
    batch = tiny_batch(am.model)
    torch.testing.assert_close(run(am, batch, adapters=[static] * 4), run(am, batch, adapters=[name] * 4))
    fresh = _model()  # a model that never saw the generator loads it as a plain bottleneck adapter
    fresh.load_adapter(str(path), name="x")
    torch.testing.assert_close(run(fresh, batch, adapters=["x"] * 4), run(am, batch, adapters=[name] * 4))


def test_parameter_counts():
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    gen = _gen(am)
    assert gen.adapter_parameters() == 2 * (2 * 32 * 8 + 32 + 8)
    assert gen.adapter_parameters() == sum(v.numel() for k, v in _static_state(am).items())
    own = sum(p.numel() for p in gen.parameters())
    for lang in ("swh", "tgl", "eng"):
        gen.attach(am, lang)
    am.train_adapters("swh", "tgl", "eng")
    assert sum(p.numel() for p in am.parameters() if p.requires_grad) == own  # shared, counted once


def _static_state(am: AdaptedModel) -> dict:
    from xlpeft.methods import BottleneckConfig
    am.add_adapter("static", BottleneckConfig(reduction_factor=4, stacks=("encoder",)))
    try:
        return am.adapter_state_dict("static")
    finally:
        am.delete_adapter("static")


def test_seq2seq_generators_adapt_the_encoder():
    am = _model("t5")
    gen = _gen(am)
    assert gen.slots == ["encoder.0.ffn", "encoder.1.ffn"]
    gen.attach(am, "deu")
    batch = tiny_batch(am.model)
    assert (run(am, batch, adapters=["deu"] * 4) - run(am, batch)).abs().max() > 1e-4


def test_typology_weighted_average(tmp_path):
    am = _model()
    for lang in ("ind", "spa", "jpn"):
        am.add_adapter(lang, "pfeiffer")
        perturb(am, lang, seed=len(lang) + ord(lang[0]))
    weights = typology_weights("tgl", ["ind", "spa", "jpn", "tgl"])
    assert list(weights) == ["ind", "spa", "jpn"] and sum(weights.values()) == pytest.approx(1.0)
    assert weights["ind"] > weights["jpn"]
    used = average_by_typology(am, "tgl", ["ind", "spa", "jpn"])
    assert used == weights and "tgl" in am.configs
    key = next(iter(am.adapter_state_dict("tgl")))
    expect = sum(w * am.adapter_state_dict(s)[key] for s, w in weights.items())
    torch.testing.assert_close(am.adapter_state_dict("tgl")[key], expect)
    with pytest.raises(XlpeftValueError, match="`sources` can be languages other than 'tgl'"):
        typology_weights("tgl", ["tgl"])


def test_bad_inputs(tmp_path):
    am = _model()
    gen = _gen(am)
    with pytest.raises(XlpeftKeyError, match=r"unknown language code 'swq'.*Did you mean"):
        gen.attach(am, "swq")
    assert am.adapter_names == []
    with pytest.raises(XlpeftValueError, match="`task` can be '' for a madg generator; got 'genre'"):
        gen.attach(am, "swh", "genre")
    hx = _gen(am, "hyperx")
    with pytest.raises(XlpeftValueError, match="`task` can be 'mlm', 'genre'; got 'pos'"):
        hx.weights("swh", "pos")
    with pytest.raises(XlpeftValueError, match="has no known value in 'syntax_wals'"):
        build_generator("madg", am, features="syntax_wals", missing="zero", **SMALL).weights("nah")
    imputed = build_generator("madg", am, features="syntax_wals", missing="knn", **SMALL)
    assert torch.isfinite(imputed.weights("nah")[0]).all()
    with pytest.raises(XlpeftKeyError, match="unknown generator kind 'madx'"):
        build_generator("madx", am)
    with pytest.raises(XlpeftKeyError, match="unknown field of MadGConfig 'rank'"):
        build_generator("madg", am, rank=3)


def test_generator_checkpoint_round_trip_and_backbone_check(tmp_path):
    am = _model()
    gen = _gen(am)
    path = save_generator(gen, tmp_path / "gen")
    again = load_generator(path, _model())
    assert all(torch.equal(x, y) for x, y in zip(gen.weights("swh"), again.weights("swh")))
    with pytest.raises(IncompatibleAdapterError, match="trained for another backbone .*family: file 'bert' vs model 't5'"):
        load_generator(path, _model("t5"))
    with pytest.raises(XlpeftValueError, match="not a generator directory"):
        load_generator(tmp_path, am)


def test_saving_a_generated_adapter_directly_points_to_materialise(tmp_path):
    am = _model()
    _gen(am).attach(am, "swh")
    am.save_adapter("swh", str(tmp_path / "swh"))
    with pytest.raises(XlpeftValueError, match=r"holds no weights of its own: load its generator .*materialise"):
        _model().load_adapter(str(tmp_path / "swh"))
