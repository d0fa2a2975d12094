"""Sparse fine-tunings as named modules (``xlpeft.core.sft``): apply, compose, route, save, refuse."""

from __future__ import annotations

import copy
import json
import pickle
import threading
from types import SimpleNamespace

import pytest
import torch

from tiny import tiny_batch, tiny_model
from xlpeft.core.sft import parameters
from xlpeft import AdaptedModel, Average, BatchSplit, Stack
from xlpeft.errors import IncompatibleAdapterError, XlpeftKeyError, XlpeftTypeError, XlpeftValueError
from xlpeft.methods.sft import SparseFTConfig

Q = "encoder.layer.0.attention.self.query.weight"
FFN = "encoder.layer.1.output.dense.weight"
EMB = "embeddings.word_embeddings.weight"  # tied to the MLM decoder
LN = "encoder.layer.0.output.LayerNorm.bias"
HEAD = "cls.predictions.transform.dense.weight"  # only in the MLM model


def model(head: str = "masked-lm") -> AdaptedModel:
    return AdaptedModel(tiny_model("bert", head))


def random_sft(m: AdaptedModel, name: str, params: tuple[str, ...], k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(parameters(m).items())
    idx = {p: torch.randperm(shapes[p].numel(), generator=gen)[:k] for p in params}
    val = {p: torch.randn(k, generator=gen) * 0.5 for p in params}
    m.add_sft(name, idx, val)


def by_hand(m: AdaptedModel, names: list[str]) -> dict[str, torch.Tensor]:
    """θ + Σφ from the stored indices and values, computed densely here."""
    params = {n: p.detach().clone() for n, p in parameters(m).items()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for name in names:
        for pname, t in m.adapter_state_dict(name).items():
            if pname.endswith(".indices"):
                base = pname[: -len(".indices")]
                total[base].view(-1)[t] += m.adapter_state_dict(name)[base + ".values"]
    return {n: params[n] + total[n] for n in params}


def reference(m: AdaptedModel, weights: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
    """The bare backbone with ``weights`` (a deep copy: the model itself is never written)."""
    plain = copy.deepcopy(m.model)
    for handle_owner in plain.modules():  # a copy carries our hooks: clear them for the reference
        handle_owner._forward_pre_hooks.clear()
        handle_owner._forward_hooks.clear()
    with torch.no_grad():
        for n, p in parameters(SimpleNamespace(model=plain)).items():
            p.copy_(weights[n])
        return plain(**batch).logits


def test_apply_equals_theta_plus_phi_and_remove_is_exact():
    m = model()
    batch = tiny_batch(m.model)
    theta = {n: p.detach().clone() for n, p in parameters(m).items()}
    base = m(**batch).logits
    hooks = [(len(mod._forward_pre_hooks), len(mod._forward_hooks)) for mod in m.model.modules()]
    random_sft(m, "swh", (Q, FFN, EMB, LN), 20, seed=1)
    m.set_active("swh")
    out = m(**batch).logits
    assert not torch.allclose(out, base)
    torch.testing.assert_close(out, reference(m, by_hand(m, ["swh"]), batch), rtol=0, atol=1e-6)
    for n, p in parameters(m).items():  # never written into the backbone
        assert torch.equal(p, theta[n]), n
    m.set_active(None)
    assert torch.equal(m(**batch).logits, base)
    with m.disable_adapters():
        m.set_active("swh")
        assert torch.equal(m(**batch).logits, base)
    m.delete_adapter("swh")
    assert not m.points and torch.equal(m(**batch).logits, base)
    assert hooks == [(len(mod._forward_pre_hooks), len(mod._forward_hooks)) for mod in m.model.modules()]


def test_stack_of_two_sfts_is_the_sum_and_order_free():
    m = model()
    batch = tiny_batch(m.model)
    random_sft(m, "swh", (Q, FFN), 30, seed=1)
    random_sft(m, "ner", (Q, EMB), 30, seed=2)  # overlaps at Q
    m.set_active(Stack("swh", "ner"))
    out = m(**batch).logits
    torch.testing.assert_close(out, reference(m, by_hand(m, ["swh", "ner"]), batch), rtol=0, atol=1e-6)
    m.set_active(Stack("ner", "swh"))
    assert torch.equal(m(**batch).logits, out)


def test_sft_under_a_task_adapter_and_gradients():
    m = model()
    batch = tiny_batch(m.model)
    random_sft(m, "swh", (Q, FFN), 30, seed=1)
    m.add_adapter("ner", "lora")
    with torch.no_grad():  # non-identity LoRA
        for module in m.adapter_modules("ner"):
            for p in module.parameters():
                p.normal_(0, 0.3)
    m.set_active("ner")
    adapter_only = m(**batch).logits
    m.set_active(Stack("swh", "ner"))
    both = m(**batch).logits
    m.set_active("swh")
    sft_only = m(**batch).logits
    assert not torch.allclose(both, adapter_only) and not torch.allclose(both, sft_only)
    # the same as the adapter on a backbone whose weights are θ + φ
    other = model()
    other.add_adapter("ner", "lora")
    other.load_adapter_state_dict("ner", m.adapter_state_dict("ner"))
    with torch.no_grad():
        for n, p in parameters(other).items():
            p.copy_(by_hand(m, ["swh"])[n])
    other.set_active("ner")
    torch.testing.assert_close(both, other(**batch).logits, rtol=0, atol=1e-6)
    # training the SFT: only its values get gradients; the LoRA too when trained
    m.train_adapters("swh")
    m.set_active(Stack("swh", "ner"))
    m(**batch).logits.sum().backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None}
    assert got == {n for n, _ in m.named_parameters() if n.endswith("adapters.swh.values")}


def test_routing_mixed_sft_sets_is_refused_and_same_set_routes_adapters():
    m = model()
    batch = tiny_batch(m.model)
    random_sft(m, "swh", (Q,), 10, seed=1)
    random_sft(m, "tgl", (Q,), 10, seed=2)
    m.add_adapter("a", "lora")
    m.add_adapter("b", "lora")
    with pytest.raises(XlpeftValueError, match="one set of sparse fine-tunings"):
        m(**batch, adapters=["swh", "tgl", "swh", "tgl"])
    with pytest.raises(XlpeftValueError, match="one set of sparse fine-tunings"):
        m.set_active(BatchSplit("swh", "tgl", batch_sizes=[2, 2]))
    with pytest.raises(XlpeftValueError, match="put them in a Stack"):
        m.set_active(Average("swh", "tgl"))
    setups = [Stack("swh", "a"), Stack("swh", "b"), Stack("swh", "a"), Stack("swh", "b")]
    routed = m(**batch, adapters=setups).logits
    for setup, rows in ((setups[0], [0, 2]), (setups[1], [1, 3])):
        m.set_active(setup)
        alone = m(**{k: v[rows] for k, v in batch.items()}).logits
        torch.testing.assert_close(routed[rows], alone, rtol=0, atol=1e-6)


def test_save_load_round_trip_in_a_fresh_model(tmp_path):
    m = model()
    batch = tiny_batch(m.model)
    random_sft(m, "swh", (Q, FFN, EMB), 25, seed=3)
    m.set_active("swh")
    want = m(**batch).logits
    m.save_adapter("swh", tmp_path / "swh")
    meta = json.loads((tmp_path / "swh" / "adapter_config.json").read_text())
    assert meta["config"]["method"] == "sft" and meta["config"]["params"] == sorted([Q, FFN, EMB])
    assert meta["config"]["counts"] == [25, 25, 25] and "sft_theta_sha256" in meta["backbone"]
    fresh = model()
    name = fresh.load_adapter(tmp_path / "swh", set_active=True)
    assert name == "swh"
    assert torch.equal(fresh(**batch).logits, want)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded frozen
    report = {r.name: r for r in fresh.parameter_report().adapters}["swh"]
    assert (report.parameters, report.trainable, report.changed, report.stored_bytes) == (75, 0, 75, 75 * 12)


def test_refuses_another_backbone_and_other_weights(tmp_path):
    m = model()
    random_sft(m, "swh", (Q,), 5, seed=3)
    m.save_adapter("swh", tmp_path / "swh")
    from transformers import BertConfig, BertForMaskedLM
    wider = AdaptedModel(BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64)))
    with pytest.raises(IncompatibleAdapterError, match="another backbone"):
        wider.load_adapter(tmp_path / "swh")
    other = model()
    with torch.no_grad():
        parameters(other)[Q].add_(0.01)  # same shapes, other weights
    with pytest.raises(IncompatibleAdapterError, match="other backbone weights"):
        other.load_adapter(tmp_path / "swh")
    assert "swh" not in other.configs and not other.points  # a failed load changes nothing
    other.load_adapter(tmp_path / "swh", verify=False)  # applying it anyway is explicit


def test_bad_inputs_give_clear_errors():
    m = model()
    with pytest.raises(XlpeftKeyError, match="unknown backbone parameter 'encoder.nope'"):
        m.add_sft("x", {"encoder.nope": torch.tensor([0])})
    with pytest.raises(XlpeftValueError, match="can be 0..1023"):
        m.add_sft("x", {Q: torch.tensor([0, 1024])})
    with pytest.raises(XlpeftValueError, match="names an entry twice"):
        m.add_sft("x", {Q: torch.tensor([3, 3])})
    with pytest.raises(XlpeftTypeError, match="int64"):
        m.add_sft("x", {Q: torch.tensor([0.0])})
    with pytest.raises(XlpeftValueError, match="count can be 1..1024"):
        SparseFTConfig(params=(Q,), counts=(2000,), numels=(1024,))
    with pytest.raises(IncompatibleAdapterError, match="has 1000 entries"):
        m.add_adapter("x", SparseFTConfig(params=(Q,), counts=(5,), numels=(1000,)))
    assert not m.configs and not m.points


def test_threads_see_their_own_setups():
    m = model()
    batch = tiny_batch(m.model)
    random_sft(m, "swh", (Q, FFN, EMB), 40, seed=4)
    with m.routing("swh"):
        want_sft = m(**batch).logits
    want_base = m(**batch).logits
    errors: list[str] = []

    def work(routed: bool) -> None:
        for _ in range(15):
            if routed:
                with m.routing("swh"):
                    out = m(**batch).logits
                ok = torch.equal(out, want_sft)
            else:
                ok = torch.equal(m(**batch).logits, want_base)
            if not ok:
                errors.append("routed" if routed else "plain")

    threads = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_activation_checkpointing_recomputes_under_the_sft():
    m = model()
    batch = tiny_batch(m.model)
    random_sft(m, "swh", (Q, FFN), 40, seed=5)
    m.train_adapters("swh")
    m.set_active("swh")
    m.train()  # dropout 0 in the tiny config? make the comparison deterministic either way
    for module in m.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    m(**batch).logits.square().mean().backward()
    plain = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m.activation_checkpointing_enable()
    m(**batch).logits.square().mean().backward()
    for n, g in plain.items():
        torch.testing.assert_close(dict(m.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-7)


def test_bf16_rounds_once_and_restores_bit_for_bit():
    m = AdaptedModel(tiny_model("bert", "masked-lm").to(torch.bfloat16))
    random_sft(m, "swh", (Q,), 50, seed=6)
    point = m.adapter_places("swh")[Q]
    assert point.adapters["swh"].values.dtype == torch.float32  # float32 deltas on a bf16 backbone
    theta = dict(parameters(m).items())[Q].detach().clone()
    eff = point.effective(theta, ("swh",))
    exact = theta.float() + point.adapters["swh"].dense(theta)
    assert eff.dtype == torch.bfloat16
    assert ((eff.float() - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-30).all()  # unit roundoff 2⁻⁸
    batch = tiny_batch(m.model)
    m.set_active("swh")
    m(**batch)
    assert torch.equal(dict(parameters(m).items())[Q], theta)


def test_pickle_and_deepcopy_keep_sfts():
    m = model()
    batch = tiny_batch(m.model)
    random_sft(m, "swh", (Q, EMB), 10, seed=7)
    m.set_active("swh")
    want = m(**batch).logits
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(other(**batch).logits, want)
        other.delete_adapter("swh")
        assert torch.equal(m(**batch).logits, want)  # the original keeps its SFT and hooks


def test_combining_sfts_uses_the_union_of_supports():
    from xlpeft.core.sft import deltas
    from xlpeft.ops.sft_select import combine_sfts
    m = model()
    random_sft(m, "swh", (Q, FFN), 30, seed=1)
    random_sft(m, "ner", (Q, EMB), 30, seed=2)
    combine_sfts(m, "soup", {"swh": 0.5, "ner": 0.5})
    want = {p: 0.5 * deltas(m, "swh").get(p, 0) + 0.5 * deltas(m, "ner").get(p, 0) for p in (Q, FFN, EMB)}
    got = deltas(m, "soup")
    assert set(got) == {Q, FFN, EMB}
    for p in want:
        torch.testing.assert_close(got[p], want[p], rtol=0, atol=0)
    with pytest.raises(XlpeftValueError, match="combine_sfts"):
        m.average_adapters("bad", ["swh", "ner"])  # same-config averaging would mix different entries


def test_names_are_relative_to_the_base_model_so_an_mlm_sft_fits_a_task_model(tmp_path):
    mlm = model("masked-lm")
    assert EMB in parameters(mlm) and HEAD in parameters(mlm) and "bert." + Q not in parameters(mlm)
    random_sft(mlm, "swh", (Q, EMB), 10, seed=8)
    mlm.save_adapter("swh", tmp_path / "swh")
    task = model("seq-cls")  # BertForSequenceClassification: the same encoder (copied), another head
    with pytest.raises(IncompatibleAdapterError, match="other backbone weights"):
        task.load_adapter(tmp_path / "swh")  # its own random encoder is another backbone
    task.model.base_model.load_state_dict(mlm.model.base_model.state_dict(), strict=False)  # no pooler
    task.load_adapter(tmp_path / "swh", set_active=True)
    batch = tiny_batch(task.model)
    base = AdaptedModel(tiny_model("bert", "seq-cls"))
    base.model.load_state_dict(task.model.state_dict())
    with torch.no_grad():
        for n, p in parameters(base).items():
            p.copy_(by_hand(task, ["swh"])[n])
    torch.testing.assert_close(task(**batch).logits, base(**batch).logits, rtol=0, atol=1e-6)
    random_sft(mlm, "head", (HEAD,), 5, seed=9)
    mlm.save_adapter("head", tmp_path / "head")
    with pytest.raises(XlpeftKeyError, match="unknown backbone parameter 'cls.predictions"):
        task.load_adapter(tmp_path / "head")


def test_merge_and_unload_writes_theta_plus_phi():
    from xlpeft.core.sft import merge_and_unload
    m = model()
    batch = tiny_batch(m.model)
    random_sft(m, "swh", (Q, EMB), 20, seed=10)
    want_weights = by_hand(m, ["swh"])
    m.set_active("swh")
    want = m(**batch).logits
    merge_and_unload(m, "swh")
    assert "swh" not in m.configs and not m.points and m.active is None
    assert torch.equal(m(**batch).logits, want)
    assert all(torch.equal(p, want_weights[n]) for n, p in parameters(m).items())
    m.add_adapter("t", "lora")
    with pytest.raises(XlpeftValueError, match="this merges SFTs"):
        merge_and_unload(m, "t")


def test_merge_is_exact_and_reversible():
    m = model()
    batch = tiny_batch(m.model)
    theta = {n: p.detach().clone() for n, p in parameters(m).items()}
    random_sft(m, "swh", (Q, EMB), 30, seed=11)
    random_sft(m, "ner", (Q, FFN), 30, seed=12)  # overlaps swh at Q
    m.add_adapter("t", "lora")
    want = {}
    for setup in ("swh", Stack("swh", "ner"), "ner", "t"):
        m.set_active(setup)
        want[setup] = m(**batch).logits
    with m.disable_adapters():
        bare = m(**batch).logits
    expect = by_hand(m, ["swh", "ner"])
    m.merge("swh")
    m.merge("ner")
    assert m.is_merged("swh") and m.is_merged("ner")
    assert all(torch.equal(p, expect[n]) for n, p in parameters(m).items())  # θ + φ_swh + φ_ner, rounded once
    for setup, out in want.items():  # any call gets what the unmerged SFTs gave, bit for bit
        m.set_active(setup)
        assert torch.equal(m(**batch).logits, out), setup
    routed = m(**batch, adapters=[Stack("swh", "ner", "t")] * 4).logits
    assert routed.shape == want["t"].shape
    with m.disable_adapters():
        assert torch.equal(m(**batch).logits, bare)
    with pytest.raises(XlpeftValueError, match="not the last merge"):
        m.unmerge("swh")
    m.train_adapters("ner")
    m.set_active("ner")
    with pytest.raises(XlpeftValueError, match="merged into the weights, so it cannot train"):
        m(**batch)
    m.unmerge("ner")
    m.unmerge("swh")
    assert all(torch.equal(p, theta[n]) for n, p in parameters(m).items())  # exact restore
    m.merge("swh")
    m.delete_adapter("swh")  # unmerges first
    assert all(torch.equal(p, theta[n]) for n, p in parameters(m).items())


def test_a_merged_sft_exports_as_a_plain_model(tmp_path):
    from transformers import AutoModelForMaskedLM
    m = model()
    batch = tiny_batch(m.model)
    random_sft(m, "swh", (Q, FFN), 30, seed=13)
    m.set_active("swh")
    want = m(**batch).logits
    with pytest.raises(XlpeftValueError, match="unmerged"):
        m.save_merged(tmp_path / "plain")
    m.merge("swh")
    m.save_merged(tmp_path / "plain")
    plain = AutoModelForMaskedLM.from_pretrained(tmp_path / "plain").eval()
    torch.testing.assert_close(plain(**batch).logits, want, rtol=0, atol=1e-6)
