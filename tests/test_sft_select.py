"""Choosing an SFT's support (``xlpeft.ops.sft_select``): top-K, FishMask, DiffPruning, eligibility, K."""

from __future__ import annotations

import re

import pytest
import torch

from tiny import tiny_batch, tiny_model
from xlpeft.core.sft import parameters
from xlpeft import AdaptedModel
from xlpeft.errors import XlpeftValueError
from xlpeft.methods.sft import SupportConfig
from xlpeft.ops import sft_select

Q = "encoder.layer.0.attention.self.query.weight"
V = "encoder.layer.1.attention.self.value.bias"


def model() -> AdaptedModel:
    return AdaptedModel(tiny_model("bert", "masked-lm"))


def test_top_k_golden_values():
    scores = {"a": torch.tensor([[0.1, 5.0], [0.3, 2.0]]), "b": torch.tensor([4.0, 0.2, 3.0]),
              "c": torch.tensor([0.0, 0.05])}
    got = sft_select.top_k(scores, 4)  # 5.0 (a1), 4.0 (b0), 3.0 (b2), 2.0 (a3)
    assert {k: v.tolist() for k, v in got.items()} == {"a": [1, 3], "b": [0, 2]}
    assert all(v.dtype == torch.long for v in got.values())
    with pytest.raises(XlpeftValueError, match="K can be 1..9"):
        sft_select.top_k(scores, 10)


def test_lt_sft_keeps_exactly_the_largest_changes_and_resets():
    m = model()
    support = SupportConfig(count=5, include=(f"^{re.escape(Q)}$", f"^{re.escape(V)}$"))
    params = sft_select.eligible(m, support)
    assert list(params) == [Q, V]
    before = sft_select.snapshot(params)
    with torch.no_grad():  # a "phase 1": known changes, largest first
        params[Q].view(-1)[[7, 100, 3]] += torch.tensor([0.9, -0.8, 0.01])
        params[V].view(-1)[[1, 30]] += torch.tensor([0.7, -0.6])
        params[V].view(-1)[5] += 0.005
    got = sft_select.lt_sft_indices(m, before, 5)
    # |Δ|: 0.9, 0.8, 0.7, 0.6, then 0.01 (Q[3]) over 0.005 (V[5])
    assert {k: v.tolist() for k, v in got.items()} == {Q: [3, 7, 100], V: [1, 30]}
    sft_select.reset(m, before)
    assert all(torch.equal(params[n], before[n]) for n in params)


def test_fishmask_picks_the_top_fisher_entries_by_hand():
    m = model()
    params = sft_select.eligible(m, SupportConfig(count=3, include=(Q + "$",)))
    c = torch.zeros(params[Q].numel())
    c[[4, 9, 11, 500]] = torch.tensor([1.0, -3.0, 2.0, 0.5])

    def loss_fn(model, batch):  # dL/dθ = batch · c, so Σ g² = (Σ batch²) · c²
        return batch * (parameters(model)[Q].view(-1) * c).sum()

    scores = sft_select.fisher(m, [1.0, 2.0], loss_fn, params)
    torch.testing.assert_close(scores[Q].view(-1), 5.0 * c ** 2)
    assert sft_select.top_k(scores, 3)[Q].tolist() == [4, 9, 11]  # 9, 4, 11 by Fisher: 45, 20, 5
    assert not params[Q].requires_grad  # flags restored


def test_diff_pruning_density_follows_its_penalty():
    m = model()
    batch = tiny_batch(m.model)
    support = SupportConfig(include=(r"encoder\.layer\.1\.output\.dense\.weight",))
    params = sft_select.eligible(m, support)
    theta = sft_select.snapshot(params)
    torch.manual_seed(1)
    target = m(**batch).logits.detach() + torch.randn(4, 7, 128)

    def loss_fn(model, b):
        return (model(**b).logits - target).square().sum()

    densities = []
    for penalty in (0.0, 0.4, 0.6, 0.8, 1.0):
        torch.manual_seed(0)
        try:
            indices, values = sft_select.diff_pruning(m, [batch] * 30, loss_fn, support, penalty,
                                                      init_log_alpha=0.5)
        except XlpeftValueError as err:
            assert "closed every gate" in str(err)
            densities.append(0.0)
            continue
        densities.append(sft_select.density(indices, params))
        assert all(values[n].shape == indices[n].shape for n in indices)
    assert densities == sorted(densities, reverse=True), densities  # more penalty, sparser
    assert densities[0] == 1.0 and densities[-1] < 0.1, densities
    assert any(0 < d < 1 for d in densities), densities  # a penalty between leaves part of the gates open
    assert all(torch.equal(params[n], theta[n]) for n in params)  # θ untouched
    with pytest.raises(XlpeftValueError, match="closed every gate"):
        sft_select.diff_pruning(m, [batch] * 30, loss_fn, support, 30.0, init_log_alpha=0.5)
    indices, values = sft_select.diff_pruning(m, [batch] * 5, loss_fn, SupportConfig(
        count=10, include=support.include), 0.0)
    assert sum(i.numel() for i in indices.values()) == 10
    m.add_sft("dp", indices, values, selection="diffpruning")
    assert m.configs["dp"].selection == "diffpruning"


def test_eligibility_and_budgets():
    m = model()
    default = sft_select.eligible(m, SupportConfig(count=1))
    assert not any("embeddings" in n or "LayerNorm" in n or n.startswith("cls.") for n in default)
    with_ln = sft_select.eligible(m, SupportConfig(count=1, layer_norm=True))
    assert set(with_ln) - set(default) and all("LayerNorm" in n for n in set(with_ln) - set(default))
    total = sum(p.numel() for p in default.values())
    madx = sft_select.adapter_size(m, "madx-language")
    assert sft_select.budget(m, SupportConfig(like="madx-language"), total) == madx > 0
    assert not m.configs  # the probe adapter is gone
    assert sft_select.budget(m, SupportConfig(density=0.25), total) == round(0.25 * total)
    with pytest.raises(XlpeftValueError, match=f"larger than the {total} eligible entries"):
        sft_select.budget(m, SupportConfig(count=total + 1), total)
    with pytest.raises(XlpeftValueError, match="no backbone parameter is eligible"):
        sft_select.eligible(m, SupportConfig(count=1, include=("nothing-matches",)))
    with pytest.raises(XlpeftValueError, match="one of `count`"):
        SupportConfig(count=3, density=0.1)
    with pytest.raises(XlpeftValueError, match="regular expressions"):
        SupportConfig(count=3, include=("(",))
