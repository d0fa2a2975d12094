"""The S4 preset (Chen et al. 2023): spindle groups, uniform sizes per block, a strategy set per group."""

from __future__ import annotations

import pytest
import torch
from tiny import perturb, run, tiny_batch, tiny_config

from xlpeft import AdaptedModel
from xlpeft.errors import XlpeftValueError
from xlpeft.methods import preset
from xlpeft.methods.presets import s4_config, spindle_groups

DEEP = 6


def _backbone():
    from transformers import AutoModelForMaskedLM
    config = tiny_config("bert")
    config.num_hidden_layers = DEEP
    torch.manual_seed(0)
    return AutoModelForMaskedLM.from_config(config).eval()


def test_spindle_groups() -> None:
    assert [len(g) for g in spindle_groups(12)] == [2, 4, 4, 2]
    assert [len(g) for g in spindle_groups(24)] == [4, 8, 8, 4]
    assert spindle_groups(6) == [(0,), (1, 2), (3, 4), (5,)]
    assert sum(map(len, spindle_groups(7))) == 7


def test_each_group_gets_its_strategies_with_uniform_sizes() -> None:
    am = AdaptedModel(_backbone())
    am.add_adapter("s4", s4_config(DEEP))
    places = am.adapter_places("s4")
    methods_at = {}
    for key, point in places.items():
        block = int(key.split(".")[1])
        methods_at.setdefault(block, set()).add(type(point.adapters["s4"]).__name__)
    bias, bott, lora, prefix = "BiasDelta", "Bottleneck", "LoRA", "PrefixKV"
    expected = {0: {bott, lora}, 1: {bott, prefix}, 2: {bott, prefix}, 3: {bott, prefix, bias},
                4: {bott, prefix, bias}, 5: {prefix, bias, lora}}
    assert methods_at == expected
    # uniform: each method's per-block count equals its count in a full-depth adapter divided by the depth
    for part, name in zip(s4_config(DEEP).parts, ("adapter", "lora", "prefix", "bitfit")):
        am.add_adapter(name, part.replace(leave_out=()))
    per_block = {n: sum(p.numel() for m in am.adapter_modules(n) for p in m.parameters()) // DEEP
                 for n in ("adapter", "lora", "prefix", "bitfit")}
    blocks_of = {"adapter": 5, "lora": 2, "prefix": 5, "bitfit": 3}
    total = sum(p.numel() for m in am.adapter_modules("s4") for p in m.parameters())
    assert total == sum(per_block[n] * blocks_of[n] for n in per_block)


def test_routes_saves_and_refuses_merge(tmp_path) -> None:
    am = AdaptedModel(_backbone())
    for i, name in enumerate(("a", "b")):
        am.add_adapter(name, s4_config(DEEP))
        perturb(am, name, seed=i)
    batch = tiny_batch(am.model)
    plan = ["a", "b", "b", "a"]
    mixed = run(am, batch, adapters=plan)
    for name in ("a", "b"):
        am.set_active(name)
        rows = [i for i, n in enumerate(plan) if n == name]
        assert (mixed[rows] - run(am, batch)[rows]).abs().max() <= 1e-5
    am.save_adapter("a", str(tmp_path / "a"))
    fresh = AdaptedModel(_backbone())
    fresh.load_adapter(str(tmp_path / "a"), set_active=True)
    am.set_active("a")
    assert (run(fresh, batch) - run(am, batch)).abs().max() == 0
    with pytest.raises(XlpeftValueError, match=r"adapter 'a' \(union\) cannot be merged"):
        am.merge("a")
    assert preset("s4") == s4_config(12)
    with pytest.raises(XlpeftValueError, match="`num_layers` can be 1..4096"):
        s4_config(0)
