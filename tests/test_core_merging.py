"""Merging rules: ordered stacks per linear, LIFO unmerge, refusals before any change,
exact restore, one point per linear, merge_and_unload and save_merged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import perturb, run, tiny_batch, tiny_model
from transformers import AutoModel, AutoModelForSeq2SeqLM

from xlpeft import AdaptedModel, Stack
from xlpeft.core.composition import BatchSplit
from xlpeft.core.points import LinearPoint
from xlpeft.errors import XlpeftValueError
from xlpeft.methods import BitFitConfig, IA3Config, LoRAConfig

LORA_Q = LoRAConfig(r=4, targets=("q",))
IA3_Q = IA3Config(targets=("q",), input_scaled=())


def snapshot(am: AdaptedModel) -> dict:
    """Everything a refused call must leave as it was."""
    return {
        "tensors": {k: v.detach().clone() for k, v in am.state_dict().items()},
        "stacks": am.merge_stacks(),
        "merged": [n for n in am.adapter_names if am.is_merged(n)],
        "active": am.active,
        "grad": [p.requires_grad for p in am.parameters()],
        "bias": [getattr(m, "bias", None) is None for m in am.model.modules()],
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["stacks"] == b["stacks"] and a["merged"] == b["merged"] and a["active"] == b["active"]
    assert a["grad"] == b["grad"] and a["bias"] == b["bias"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for key, value in a["tensors"].items():
        torch.testing.assert_close(value, b["tensors"][key], rtol=0, atol=0, equal_nan=True, msg=key)


def refused(am: AdaptedModel, call, match: str) -> None:
    before = snapshot(am)
    with pytest.raises(XlpeftValueError, match=match):
        call()
    assert_same(before, snapshot(am))


def backbone(am: AdaptedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in am.model.state_dict().items()}


def assert_backbone(am: AdaptedModel, original: dict[str, torch.Tensor]) -> None:
    state = am.model.state_dict()
    assert state.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(state[key], value), key


def lora_ia3(family: str = "bert", head: str = "base") -> tuple[AdaptedModel, dict, torch.Tensor]:
    model = tiny_model(family, head)
    batch = tiny_batch(model)
    ref = run(model, batch)
    am = AdaptedModel(model)
    am.add_adapter("lo", LORA_Q)
    am.add_adapter("ia", IA3_Q)
    perturb(am, "lo", seed=1)
    perturb(am, "ia", seed=2)
    return am, batch, ref


def test_unmerge_is_last_in_first_out_and_restores_bit_exactly() -> None:
    am, batch, ref = lora_ia3()
    original = backbone(am)
    am.set_active(Stack("lo", "ia"))
    unmerged = run(am, batch)
    am.merge("lo")
    am.merge("ia")
    assert am.merge_stacks()["encoder.0.attention.self.query"] == ["lo", "ia"]
    torch.testing.assert_close(run(am, batch), unmerged, rtol=1e-5, atol=1e-5)
    refused(am, lambda: am.unmerge("lo"), r"last in, first out.*Unmerge 'ia' first")
    refused(am, lambda: am.delete_adapter("lo"), r"last in, first out")
    am.unmerge("ia")
    am.unmerge("lo")
    assert_backbone(am, original)
    assert torch.equal(run(am, batch), unmerged)


def test_disable_adapters_with_two_merged_is_the_bare_backbone_and_restores() -> None:
    am, batch, ref = lora_ia3()
    am.set_active(Stack("lo", "ia"))
    am.merge("lo")
    am.merge("ia")
    before = snapshot(am)
    with am.disable_adapters():
        assert torch.equal(run(am, batch), ref)
    assert_same(before, snapshot(am))


def test_merge_that_contradicts_the_active_stack_is_refused() -> None:
    am, batch, _ = lora_ia3()
    am.set_active(Stack("ia", "lo"))
    unmerged = run(am, batch)
    # merged weights act before every unmerged adapter: lo merged would run before ia
    refused(am, lambda: am.merge("lo"), r"merging 'lo'.*merged weights act first")
    am.merge("ia")
    am.merge("lo")
    torch.testing.assert_close(run(am, batch), unmerged, rtol=1e-5, atol=1e-5)
    refused(am, lambda: am.set_active(Stack("lo", "ia")), r"set_active.*merge order \['ia', 'lo'\]")
    refused(am, lambda: am.set_active(BatchSplit("ia", "lo", batch_sizes=[2, 2])), r"mixes merged")
    am.set_active(None)  # merged adapters are then part of the backbone
    torch.testing.assert_close(run(am, batch), unmerged, rtol=1e-5, atol=1e-5)


def test_merged_adapters_the_setup_does_not_name_count_as_backbone_below_it() -> None:
    am, batch, _ = lora_ia3()
    expected = run(am, batch, adapters=Stack("ia", "lo"))
    am.set_active("lo")
    am.merge("lo")
    refused(am, lambda: am.merge("ia"), r"merging 'ia'.*counts as backbone, below it")
    am.unmerge("lo")
    am.merge("ia")  # below the setup: the backbone is now ia's scaled weights
    am.merge("lo")
    torch.testing.assert_close(run(am, batch), expected, rtol=1e-5, atol=1e-5)


def test_input_scaling_merges_after_the_adapters_that_read_its_output() -> None:
    model = tiny_model("bert")
    batch = tiny_batch(model)
    am = AdaptedModel(model)
    am.add_adapter("lo", LoRAConfig(r=4, targets=("ffn_down",)))
    am.add_adapter("ia", IA3Config(targets=("ffn_down",)))  # scales the FFN activation (input)
    perturb(am, "lo", seed=1)
    perturb(am, "ia", seed=2)
    am.set_active(Stack("ia", "lo"))
    unmerged = run(am, batch)
    refused(am, lambda: am.merge("ia"), r"merging 'ia'")  # lo reads the scaled input
    am.merge("lo")
    am.merge("ia")
    torch.testing.assert_close(run(am, batch), unmerged, rtol=1e-5, atol=1e-5)


def test_two_bitfit_merges_on_a_bias_free_linear_own_the_bias_together() -> None:
    model = tiny_model("t5", "seq2seq")
    batch = tiny_batch(model)
    ref = run(model, batch)
    keys = set(model.state_dict())
    am = AdaptedModel(model)
    for name, seed in (("b1", 1), ("b2", 2)):
        am.add_adapter(name, BitFitConfig(targets=("q",)))
        perturb(am, name, seed=seed)
    am.set_active(Stack("b1", "b2"))
    unmerged = run(am, batch)
    am.merge("b1")
    am.merge("b2")
    torch.testing.assert_close(run(am, batch), unmerged, rtol=1e-5, atol=1e-5)
    assert am.added_biases() and set(am.model.state_dict()) > keys
    refused(am, lambda: am.unmerge("b1"), r"last in, first out")
    am.unmerge("b2")  # the bias stays: it belongs to b1's entry
    torch.testing.assert_close(run(am, batch), unmerged, rtol=1e-5, atol=1e-5)
    am.unmerge("b1")
    assert set(am.model.state_dict()) == keys and not am.added_biases()
    am.set_active(None)
    assert torch.equal(run(am, batch), ref)


def test_routed_forward_is_refused_while_merged() -> None:
    model = tiny_model("bert")
    batch = tiny_batch(model)
    am = AdaptedModel(model)
    for name, seed in (("a", 1), ("b", 2)):
        am.add_adapter(name, LORA_Q)
        perturb(am, name, seed=seed)
    am.merge("a")
    refused(am, lambda: am(**batch, adapters=["a", "b", "a", "b"]), r"routed forward.*\['a'\] merged")
    refused(am, lambda: am(**batch, adapters="b"), r"routed forward")
    am.unmerge("a")
    mixed = run(am, batch, adapters=["a", "b", "a", "b"])
    alone = run(am, batch, adapters="b")
    torch.testing.assert_close(mixed[1::2], alone[1::2], rtol=1e-5, atol=1e-5)


def test_editing_or_training_a_merged_adapter_is_refused() -> None:
    am, batch, ref = lora_ia3()
    original = backbone(am)
    tensors = {k: torch.randn_like(v) for k, v in am.adapter_state_dict("lo").items()}
    am.train_adapters("lo")
    am.merge("lo")
    assert not any(p.requires_grad for m in am.adapter_modules("lo") for p in m.parameters())
    refused(am, lambda: am.load_adapter_state_dict("lo", tensors), r"load_adapter_state_dict can take "
                                                                   r"unmerged adapters; got merged \['lo'\]")
    refused(am, lambda: am.train_adapters("lo"), r"train_adapters can take unmerged")
    refused(am, lambda: am.train_adapters(Stack("lo", "ia")), r"train_adapters can take unmerged")
    refused(am, lambda: am.initialize_adapters(), r"initialize_adapters can take unmerged")
    am.unmerge("lo")
    assert_backbone(am, original)
    assert all(p.requires_grad for m in am.adapter_modules("lo") for p in m.parameters())  # as before merge


def test_ia3_scale_that_cannot_be_divided_out_is_refused_at_merge() -> None:
    am, batch, ref = lora_ia3()
    with torch.no_grad():
        next(iter(am.adapter_modules("ia"))).ia3_l[3] = 1e-8
    refused(am, lambda: am.merge("ia"), r"\(IA\)3 scale can be merged when every \|l\| ≥ 1e-06")
    with am.disable_adapters():
        assert torch.equal(run(am, batch), ref)
    am.delete_adapter("ia")


def test_non_finite_adapter_is_refused_at_merge() -> None:
    am, _, _ = lora_ia3()
    with torch.no_grad():
        next(iter(am.adapter_modules("lo"))).lora_B.weight[0, 0] = float("nan")
    refused(am, lambda: am.merge("lo"), r"values are finite; got NaN/inf")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    model = tiny_model("bert").to(dtype)
    batch = tiny_batch(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    am = AdaptedModel(model)
    am.add_adapter("lo", LoRAConfig(r=4, targets=("q", "k")))  # k: LoRA, (IA)3 and BitFit on one linear
    am.add_adapter("ia", IA3Config(targets=("k",), input_scaled=()))
    am.add_adapter("bf", BitFitConfig(targets=("k",)))
    for i, name in enumerate(("lo", "ia", "bf")):
        perturb(am, name, seed=i)
    am.set_active(Stack("lo", "ia", "bf"))
    unmerged = run(am, batch).float()
    for name in ("lo", "ia", "bf"):
        am.merge(name)
    merged = run(am, batch).float()
    torch.testing.assert_close(merged, unmerged, rtol=0.05, atol=0.05)  # one rounding of W per merge
    assert am.merge_stacks()["encoder.0.attention.self.key"] == ["lo", "ia", "bf"]
    for name in ("bf", "ia", "lo"):
        am.unmerge(name)
    assert_backbone(am, original)


def test_merge_and_unload_keeps_the_outputs_and_drops_the_adapters() -> None:
    am, batch, ref = lora_ia3()
    am.add_adapter("other", "pfeiffer")
    am.set_active(Stack("ia", "lo"))
    out = run(am, batch)
    refused(am, lambda: am.merge_and_unload(["lo", "ia"]), r"merging 'lo'")
    assert am.merge_and_unload() == ["ia", "lo"]
    assert am.adapter_names == ["other"] and am.merge_stacks() == {}
    assert not any(isinstance(p, LinearPoint) for p in am.points.values())
    torch.testing.assert_close(run(am.model, batch), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,head,auto", [("bert", "base", AutoModel),
                                              ("t5", "seq2seq", AutoModelForSeq2SeqLM)])
def test_save_merged_writes_a_plain_hf_model(tmp_path: Path, family: str, head: str, auto) -> None:
    am, batch, _ = lora_ia3(family, head)
    am.set_active(Stack("ia", "lo"))
    path = tmp_path / "merged"
    refused(am, lambda: am.save_merged(path), r"save_merged.*unmerged.*\['ia', 'lo'\]")
    assert not path.exists()
    am.merge("ia")
    am.merge("lo")
    am.save_merged(path)
    loaded = auto.from_pretrained(path).eval()
    assert torch.equal(run(loaded, batch), run(am, batch))
    am.save_merged(path)  # replacing an earlier export is fine
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


def test_save_merged_refuses_what_a_plain_model_cannot_hold(tmp_path: Path) -> None:
    model = tiny_model("t5", "seq2seq")
    am = AdaptedModel(model)
    am.add_adapter("bf", BitFitConfig(targets=("q",)), set_active=True)
    perturb(am, "bf")
    am.merge("bf")
    refused(am, lambda: am.save_merged(tmp_path / "m"),
            r"bias-free linears.*encoder.0.layer.0.SelfAttention.q")
    assert not (tmp_path / "m").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    am.unmerge("bf")
    am.set_active(None)
    with pytest.raises(XlpeftValueError, match="no xlpeft model"):
        am.save_merged(other)
    assert (other / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------- one point per linear


def test_a_linear_reached_by_role_regex_and_peft_file_has_one_point(tmp_path: Path) -> None:
    model = tiny_model("bert")
    batch = tiny_batch(model)
    am = AdaptedModel(model)
    am.add_adapter("ia", IA3_Q)
    am.add_adapter("ro", LORA_Q)
    am.add_adapter("pat", LoRAConfig(r=4, target_patterns=(r".*attention\.self\.query",)))
    for i, name in enumerate(("ia", "ro", "pat")):
        perturb(am, name, seed=i)
    am.save_adapter("ro", str(tmp_path / "peft"), format="peft")
    assert am.load_adapter(str(tmp_path / "peft"), name="pe") == "pe"
    queries = [m for n, m in am.model.named_modules() if n.endswith("attention.self.query")]
    for linear in queries:
        points = [p for p in am.points.values() if isinstance(p, LinearPoint) and p.linear is linear]
        assert len(points) == 1 and set(points[0].adapters) == {"ia", "ro", "pat", "pe"}
    # "pat" keeps its own place names (module paths), whatever point it shares
    assert all(k.startswith("encoder.layer.") for k in am.adapter_state_dict("pat"))
    # the PEFT-loaded copy of "ro" composes in Stack order exactly like "ro"
    for order in (("pe", "ia"), ("ia", "pe")):
        same = tuple("ro" if n == "pe" else n for n in order)
        torch.testing.assert_close(run(am, batch, adapters=Stack(*order)),
                                   run(am, batch, adapters=Stack(*same)), rtol=1e-6, atol=1e-6)
    first, second = run(am, batch, adapters=Stack("pat", "ia")), run(am, batch, adapters=Stack("ia", "pat"))
    assert (first - second).abs().max() > 1e-3  # order matters on the shared point
    am.save_adapter("pat", str(tmp_path / "pat"))  # saved beside role adapters, it loads alone
    fresh = AdaptedModel(tiny_model("bert"))
    fresh.load_adapter(str(tmp_path / "pat"))
    assert torch.equal(run(fresh, batch, adapters="pat"), run(am, batch, adapters="pat"))


def test_merge_under_inference_mode_unmerges_outside_it() -> None:
    model = tiny_model("t5")
    batch = tiny_batch(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    am = AdaptedModel(model)
    am.add_adapter("bf", BitFitConfig(targets=("q",)))
    am.add_adapter("lo", LORA_Q)
    perturb(am, "bf")
    perturb(am, "lo")
    with torch.inference_mode():  # serving code merges here; the created bias must outlive the block
        am.merge("bf")
        am.merge("lo")
    am.unmerge("lo")
    am.unmerge("bf")
    assert_backbone(am, original)
