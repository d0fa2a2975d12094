"""SparseAdapter: scores, achieved sparsity, fixed masks, accounting, files, Large-Sparse."""

from __future__ import annotations

import math

import pytest
import torch

from tiny import tiny_batch, tiny_model
from xlpeft import AdaptedModel
from xlpeft.errors import XlpeftKeyError, XlpeftValueError
from xlpeft.methods import BottleneckConfig, ConfigUnion, IA3Config, LoRAConfig
from xlpeft.methods.sparse import (
    SparseConfig, er_keep, grasp_scores, large_sparse, masks_from_scores,
)
from xlpeft.ops.sparsify import _hessian_grad, prunable_layers, sparsify

# non-zero init (as in the paper) so that every score is informative; mixed shapes for ER
DENSE = BottleneckConfig(reduction_factor=4, non_linearity="gelu", placement=("attn", "ffn"),
                         init_zero_up=False)
MIXED = ConfigUnion((DENSE, LoRAConfig(r=2, targets=("q", "v"), init_zero_b=False)))
METHODS = ["random", "magnitude", "er", "snip", "grasp"]


def _mlm_batch(model: torch.nn.Module, seed: int = 0) -> dict:
    """A masked-LM batch with a real loss: 30% of tokens masked, labels elsewhere -100."""
    batch = tiny_batch(model, batch=4, seq=9, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    chosen = (torch.rand(batch["input_ids"].shape, generator=gen) < 0.3) & (batch["attention_mask"] == 1)
    chosen[:, 1] = True
    batch["labels"] = batch["input_ids"].masked_fill(~chosen, -100)
    batch["input_ids"] = batch["input_ids"].masked_fill(chosen, 4)
    return batch


def _model(config=MIXED, name: str = "a") -> AdaptedModel:
    model = AdaptedModel(tiny_model("bert", "masked-lm"))
    torch.manual_seed(0)
    model.add_adapter(name, config)
    return model


def _masks(model: AdaptedModel, name: str) -> list[torch.Tensor]:
    return [layer.weight_mask.clone() for _, layer in prunable_layers(model, name)]


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("method", METHODS)
def test_achieved_sparsity_equals_requested(method: str, scope: str) -> None:
    model = _model()
    batches = [_mlm_batch(model.model, 0), _mlm_batch(model.model, 1)]
    summary = sparsify(model, "a", 0.7, method, batches=batches, scope=scope, n_batches=2)
    layers = prunable_layers(model, "a")
    assert summary["layers"] == len(layers) == 16      # (4 bottlenecks + 4 LoRAs) × 2
    total = sum(layer.weight.numel() for _, layer in layers)
    kept = sum(int(layer.weight_mask.sum()) for _, layer in layers)
    assert (summary["total"], summary["kept"]) == (total, kept)
    assert summary["uninformed"] == []
    if scope == "layer" and method != "er":
        for _, layer in layers:
            assert abs(int(layer.weight_mask.sum()) - 0.3 * layer.weight.numel()) <= 1
    else:
        assert kept == round(0.3 * total)
    assert summary["sparsity"] == pytest.approx(0.7, abs=1 / total * len(layers))
    for _, layer in layers:                             # pruned weights are zero now
        assert torch.all(layer.weight[~layer.weight_mask] == 0)


def test_er_allocates_by_fan_and_caps_dense_layers() -> None:
    shapes = [torch.Size([8, 32]), torch.Size([32, 8]), torch.Size([2, 32]), torch.Size([32, 2])]
    keep = er_keep(shapes, 0.7)
    sizes = [math.prod(s) for s in shapes]
    assert sum(keep) == round(0.3 * sum(sizes))
    density = [k / n for k, n in zip(keep, sizes)]
    ratio = [sum(s) / math.prod(s) for s in shapes]   # (n_in + n_out) / (n_in · n_out)
    eps = density[0] / ratio[0]
    for d, r in zip(density, ratio):
        assert d == pytest.approx(eps * r, abs=2 / 64)
    capped = er_keep(shapes, 0.1)                      # the LoRA-shaped layers would exceed 1
    assert capped[2:] == sizes[2:] and sum(capped) == round(0.9 * sum(sizes))


def test_global_scope_prunes_an_uninformed_layer_at_random_not_whole() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(10, 10, generator=gen), torch.zeros(10, 10)]  # e.g. a zero-init up-projection
    masks, uninformed = masks_from_scores(scores, 0.6, "global", gen)
    assert uninformed == [1]
    assert int(masks[1].sum()) == 40 and int(masks[0].sum()) == 40
    assert torch.equal(masks[0], scores[0] >= scores[0].flatten().sort().values[60])


def test_hessian_gradient_by_double_backprop() -> None:
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    hg = _hessian_grad(lambda batch: (w ** 3).sum(), [w], [{}])[0]
    torch.testing.assert_close(hg, 18 * w.detach() ** 3)   # g = 3w², H = diag(6w)
    # GraSP removes the largest S = −w ⊙ Hg, so it keeps the largest w ⊙ Hg
    score = grasp_scores([w], [hg])[0]
    torch.testing.assert_close(score, 18 * w.detach() ** 4)
    masks, _ = masks_from_scores([score], 2 / 3, "layer", torch.Generator().manual_seed(0))
    assert masks[0].tolist() == [False, False, True]


def test_masks_hold_through_adamw_with_weight_decay() -> None:
    model = _model()
    batch = _mlm_batch(model.model)
    sparsify(model, "a", 0.8, "snip", batches=[batch], scope="layer")
    layers = prunable_layers(model, "a")
    start = [layer.weight.detach().clone() for _, layer in layers]
    model.train_adapters("a")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    for _ in range(4):
        opt.zero_grad()
        model(**batch, adapters="a").loss.backward()
        for _, layer in layers:
            assert torch.all(layer.weight.grad[~layer.weight_mask] == 0)
        opt.step()
    for (_, layer), before in zip(layers, start):
        pruned = ~layer.weight_mask
        assert torch.all(layer.weight[pruned] == 0) and torch.all(layer.effective_weight()[pruned] == 0)
        assert not torch.equal(layer.weight[~pruned], before[~pruned])   # kept weights did train


def test_parameter_report_counts_kept_weights_as_changed() -> None:
    model = _model(DENSE)
    dense = sum(p.numel() for m in model.adapter_modules("a") for p in m.parameters())
    before = model.parameter_report().adapters[0]
    assert before.changed == before.trainable == dense
    summary = sparsify(model, "a", 0.75, "magnitude", scope="layer")
    biases = sum(int((m.bias != 0).sum()) for _, m in prunable_layers(model, "a"))
    report = model.parameter_report().adapters[0]
    assert report.changed == summary["kept"] + biases      # biases are never pruned
    assert report.trainable == report.parameters == dense  # the dense tensors still train


def test_save_load_keeps_mask_and_outputs(tmp_path) -> None:
    model = _model(ConfigUnion((DENSE, LoRAConfig(r=2, init_zero_b=False))), name="s")
    sparsify(model, "s", 0.6, "random", scope="layer", seed=3)
    batch = _mlm_batch(model.model)
    with torch.no_grad():
        expected = model(**batch, adapters="s").logits
    model.save_adapter("s", tmp_path / "s")
    fresh = AdaptedModel(tiny_model("bert", "masked-lm"))
    fresh.load_adapter(tmp_path / "s", name="s")
    for old, new in zip(_masks(model, "s"), _masks(fresh, "s")):
        assert new.dtype == torch.bool and torch.equal(old, new)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch, adapters="s").logits, expected)
    # the mask keeps acting after loading: writing into pruned weights changes nothing
    with torch.no_grad():
        for _, layer in prunable_layers(fresh, "s"):
            layer.weight[~layer.weight_mask] = 5.0
        torch.testing.assert_close(fresh(**batch, adapters="s").logits, expected)


@pytest.mark.parametrize("config,k", [(BottleneckConfig(reduction_factor=8), 4),
                                      (LoRAConfig(r=2, alpha=4), 3)])
def test_large_sparse_keeps_the_dense_count(config, k: int) -> None:
    wide, sparsity = large_sparse(config, k)
    assert sparsity == pytest.approx(1 - 1 / k)
    model = _model(config, name="dense")
    model.add_adapter("wide", wide)
    dense = sum(layer.weight.numel() for _, layer in prunable_layers(model, "dense"))
    total_wide = sum(layer.weight.numel() for _, layer in prunable_layers(model, "wide"))
    assert total_wide == k * dense
    summary = sparsify(model, "wide", sparsity, "magnitude")
    assert abs(summary["kept"] - dense) <= 1
    if isinstance(wide, LoRAConfig):
        assert wide.alpha / wide.r == config.alpha / config.r


def test_snip_on_an_mlm_loss_differs_from_magnitude() -> None:
    snip, mag = _model(DENSE), _model(DENSE)
    batches = [_mlm_batch(snip.model, s) for s in range(2)]
    summary = sparsify(snip, "a", 0.8, "snip", batches=batches, n_batches=2)
    sparsify(mag, "a", 0.8, "magnitude")
    assert summary["uninformed"] == []
    a = torch.cat([m.flatten() for m in _masks(snip, "a")])
    b = torch.cat([m.flatten() for m in _masks(mag, "a")])
    assert a.sum() == b.sum()
    assert (a != b).float().mean() > 0.1


def test_every_masked_linear_is_pruned_biases_are_not() -> None:
    model = _model("madx-language")    # bottleneck + invertible (shared coupling)
    biases = {n: m.bias.detach().clone() for n, m in prunable_layers(model, "a")}
    summary = sparsify(model, "a", 0.5, "random", scope="layer")
    names = list(summary["per_layer"])
    assert any(".F." in n for n in names) and any(".G." in n for n in names)
    assert any(n.endswith(".down") for n in names) and any(n.endswith(".up") for n in names)
    for n, m in prunable_layers(model, "a"):
        assert m.weight_mask is not None and torch.equal(m.bias, biases[n])


def test_errors_are_clear() -> None:
    model = _model(DENSE)
    batch = _mlm_batch(model.model)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(XlpeftValueError, match=r"`sparsity` can be a fraction in \[0, 1\)"):
            sparsify(model, "a", bad, "random")
    methods = "'random', 'magnitude', 'er', 'snip', 'grasp'"
    with pytest.raises(XlpeftValueError, match=f"`method` can be {methods}; got 'l1'"):
        sparsify(model, "a", 0.5, "l1")
    with pytest.raises(XlpeftValueError, match="`scope` can be 'global', 'layer'"):
        sparsify(model, "a", 0.5, "random", scope="block")
    for method in ("snip", "grasp"):
        with pytest.raises(XlpeftValueError, match="pass `batches`"):
            sparsify(model, "a", 0.5, method)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(XlpeftValueError, match="no `loss`.*loss_fn"):
        sparsify(model, "a", 0.5, "snip", batches=[no_labels])
    with pytest.raises(XlpeftValueError, match="`batches` is empty"):
        sparsify(model, "a", 0.5, "snip", batches=[])
    with pytest.raises(XlpeftKeyError, match="unknown adapter 'b'"):
        sparsify(model, "b", 0.5, "random")
    model.add_adapter("v", IA3Config())
    with pytest.raises(XlpeftValueError, match="adapter 'v' \\(ia3\\) has no prunable weights"):
        sparsify(model, "v", 0.5, "magnitude")
    model.add_adapter("c", "compacter")
    with pytest.raises(XlpeftValueError, match="no prunable weights"):
        sparsify(model, "c", 0.5, "magnitude")
    with pytest.raises(XlpeftValueError, match="no prunable width"):
        large_sparse(IA3Config(), 2)
    with pytest.raises(XlpeftValueError, match="`k` can be a width multiplier"):
        large_sparse(DENSE, 0.5)
    assert all(m.weight_mask is None for _, m in prunable_layers(model, "a"))  # nothing half-done


def test_loss_fn_and_sparsity_zero() -> None:
    model = _model(DENSE)
    batch = {k: v for k, v in _mlm_batch(model.model).items() if k != "labels"}
    summary = sparsify(model, "a", 0.0, "snip", batches=[batch],
                       loss_fn=lambda out, b: out.logits.logsumexp(-1).mean())
    assert summary["kept"] == summary["total"] and summary["sparsity"] == 0
    assert SparseConfig(0.5).method == "snip" and SparseConfig(0.5, "grasp").needs_data
