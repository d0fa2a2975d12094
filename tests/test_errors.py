"""Every error a user can trigger in the core: the type, a message that says
what was expected and what was got, and no half-done change left behind.
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_batch, tiny_model

from xlpeft import AdaptedModel, Average, BatchSplit, Fuse, Stack, XlpeftError
from xlpeft.errors import XlpeftKeyError, XlpeftTypeError, XlpeftValueError
from xlpeft.methods import (
    BitFitConfig, BottleneckConfig, ConfigUnion, IA3Config, InvertibleConfig, LoRAConfig,
    config_from_dict, preset,
)

KNOWN = r"known: hin, swh"


@pytest.fixture
def am() -> AdaptedModel:
    model = AdaptedModel(tiny_model("bert"))
    model.add_adapter("swh", "pfeiffer")
    model.add_adapter("hin", "lora")
    return model


@pytest.fixture
def batch(am: AdaptedModel) -> dict:
    return tiny_batch(am.model, batch=2)


def backbone_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def snapshot(am: AdaptedModel) -> tuple:
    return (list(am.points), {k: sorted(p.adapters) for k, p in am.points.items()}, list(am.shared),
            list(am.configs), backbone_hooks(am.model), sum(p.numel() for p in am.parameters()))


# ---------------------------------------------------------------- unknown names


def test_unknown_adapter_in_set_active(am: AdaptedModel) -> None:
    with pytest.raises(XlpeftKeyError, match=rf"unknown adapter 'swa'; {KNOWN}. Did you mean 'swh'"):
        am.set_active("swa")
    with pytest.raises(XlpeftKeyError, match=rf"unknown adapter 'xyz'; {KNOWN}"):
        am.set_active(Stack("swh", Fuse("hin", "xyz")))
    assert am.active is None


def test_unknown_adapter_in_forward(am: AdaptedModel, batch: dict) -> None:
    with pytest.raises(XlpeftKeyError, match=rf"unknown adapter 'swx'; {KNOWN}"):
        am(**batch, adapters=["swh", "swx"])
    with pytest.raises(XlpeftKeyError, match=rf"unknown adapter 'nope'; {KNOWN}"):
        am(**batch, adapters=Stack("nope", "swh"))


def test_unknown_adapter_in_train_delete_merge(am: AdaptedModel) -> None:
    for call in (lambda: am.train_adapters("swh", "xyz"), lambda: am.train_adapters(Stack("swh", "xyz")),
                 lambda: am.delete_adapter("xyz"), lambda: am.merge("xyz"),
                 lambda: am.adapter_state_dict("xyz")):
        with pytest.raises(XlpeftKeyError, match=rf"unknown adapter 'xyz'; {KNOWN}"):
            call()
    with pytest.raises(KeyError):  # the builtin family still catches it
        am.train_adapters("xyz")


def test_unknown_preset_lists_presets(am: AdaptedModel) -> None:
    with pytest.raises(XlpeftKeyError, match=r"unknown preset 'pfeifer'; known: .*houlsby.*Did you mean 'pfeiffer'"):
        am.add_adapter("x", "pfeifer")
    with pytest.raises(XlpeftKeyError, match="unknown preset"):
        preset("madx")


# ---------------------------------------------------------------- adding adapters


def test_duplicate_and_malformed_names(am: AdaptedModel) -> None:
    with pytest.raises(XlpeftValueError, match=r"adapter named 'swh' already exists; delete_adapter\('swh'\)"):
        am.add_adapter("swh", "lora")
    for bad in ("a.b", "a+b", "", "a b"):
        with pytest.raises(XlpeftValueError, match="an adapter name must be a non-empty string"):
            am.add_adapter(bad)
    for taken in ("to", "train", "training", "keys"):  # adapters are keys of torch ModuleDicts
        with pytest.raises(XlpeftValueError, match=f"cannot be a torch ModuleDict attribute; got '{taken}'"):
            am.add_adapter(taken)
    with pytest.raises(XlpeftTypeError, match="can be a preset name, a dict or an AdapterConfig; got int"):
        am.add_adapter("x", 5)


def test_lora_target_without_role_lists_candidates(am: AdaptedModel) -> None:
    with pytest.raises(XlpeftKeyError, match=r"target 'qq' matches no module role: `targets` can be q, k, v, "
                                             r"o, .*; got 'qq'. Did you mean 'q'\?.*target_patterns"):
        am.add_adapter("x", LoRAConfig(targets=("qq",)))
    with pytest.raises(XlpeftKeyError, match=r"target 'ffn_dwn'.*Did you mean 'ffn_down'"):
        am.add_adapter("x", IA3Config(targets=("ffn_dwn",), input_scaled=()))
    with pytest.raises(XlpeftKeyError, match="target 'query' matches no module role"):
        am.add_adapter("x", BitFitConfig(targets=("query",)))


def test_target_patterns_matching_nothing(am: AdaptedModel) -> None:
    with pytest.raises(XlpeftKeyError, match=r"pattern 'quer' matches no nn.Linear.*Close candidates:.*query"):
        am.add_adapter("x", LoRAConfig(target_patterns=("quer",)))
    with pytest.raises(XlpeftValueError, match="not a valid regular expression"):
        am.add_adapter("x", LoRAConfig(target_patterns=("(",)))


def test_no_place_for_adapter(am: AdaptedModel) -> None:
    with pytest.raises(XlpeftValueError, match=r"adapter 'x' \(lora\) found no place on this bert model"):
        am.add_adapter("x", LoRAConfig(targets=("cross_q",)))
    with pytest.raises(XlpeftValueError, match="found no place"):
        am.add_adapter("x", BottleneckConfig(placement=("cross",)))


@pytest.mark.parametrize("family", ["bert", "mbart"])
def test_failed_add_adapter_leaves_model_unchanged(family: str) -> None:
    model = tiny_model(family, "masked-lm" if family == "bert" else "seq2seq")
    am = AdaptedModel(model)
    bare = backbone_hooks(model)
    am.add_adapter("keep", ConfigUnion((BottleneckConfig(), LoRAConfig(targets=("q",)))))
    hooks = backbone_hooks(model)
    before = snapshot(am)
    clash = ConfigUnion((InvertibleConfig(), BottleneckConfig(placement=("attn",)), LoRAConfig(targets=("q",)),
                         IA3Config(targets=("q",), input_scaled=())))  # LoRA and IA3 land on q: fails late
    with pytest.raises(XlpeftValueError, match=r"two parts of adapter 'bad' land on .*(query|q_proj)"):
        am.add_adapter("bad", clash)
    assert snapshot(am) == before and backbone_hooks(model) == hooks
    for failing in (LoRAConfig(targets=("cross_q",), stacks=("encoder",)), LoRAConfig(target_patterns=("nope",)),
                    "pfeifer", LoRAConfig(targets=("qq",))):
        with pytest.raises(XlpeftError):
            am.add_adapter("bad", failing)
        assert snapshot(am) == before
    am.add_adapter("bad", "houlsby")  # the name is still free
    am.delete_adapter("bad")
    am.delete_adapter("keep")
    assert backbone_hooks(model) == bare and not am.points and not am.shared


def test_failed_add_on_a_fresh_model_leaves_no_hooks() -> None:
    model = tiny_model("bert", "masked-lm")
    hooks = backbone_hooks(model)
    am = AdaptedModel(model)
    stack_hooks = backbone_hooks(model) - hooks  # AdaptedModel's own stack markers
    with pytest.raises(XlpeftValueError, match="two parts of adapter"):
        am.add_adapter("bad", ConfigUnion((InvertibleConfig(), LoRAConfig(targets=("q",)),
                                           IA3Config(targets=("q",), input_scaled=()))))
    assert backbone_hooks(model) == hooks + stack_hooks and not am.points and not am.shared
    assert not am.configs


# ---------------------------------------------------------------- setups and routing


def test_invalid_nesting(am: AdaptedModel) -> None:
    with pytest.raises(XlpeftValueError, match=r"Fuse children can be adapter name; got Stack\('swh', 'hin'\)"):
        am.set_active(Fuse(Stack("swh", "hin"), "swh"))
    split = BatchSplit("swh", "hin", batch_sizes=[1, 1])
    with pytest.raises(XlpeftValueError, match=r"Stack children can be adapter name, Fuse, Average; got BatchSplit"):
        am.set_active(Stack(split, "swh"))
    with pytest.raises(XlpeftValueError, match="Average children can be adapter name; got Stack"):
        am.train_adapters(Average(Stack("swh", "hin"), "swh"))
    with pytest.raises(XlpeftValueError, match="BatchSplit children can be .*; got BatchSplit"):
        am.set_active(BatchSplit(split, "swh", batch_sizes=[1, 1]))
    with pytest.raises(XlpeftTypeError, match="a setup can be an adapter name, Stack, .*; got int"):
        am.set_active(3)


def test_bad_blocks() -> None:
    with pytest.raises(XlpeftValueError, match="Fuse needs at least two adapters"):
        Fuse("a")
    with pytest.raises(XlpeftValueError, match="Stack needs at least one child; got none"):
        Stack()
    with pytest.raises(XlpeftValueError, match="Average got 2 adapters but 1 weights"):
        Average("a", "b", weights=[1])
    with pytest.raises(XlpeftValueError, match="Average weights must sum to > 0"):
        Average("a", "b", weights=[1, -1])
    with pytest.raises(XlpeftValueError, match=r"BatchSplit needs one non-negative size per child \(2\); got \[1\]"):
        BatchSplit("a", "b", batch_sizes=[1])
    with pytest.raises(XlpeftValueError, match="non-negative size"):
        BatchSplit("a", "b", batch_sizes=[3, -1])


def test_routing_length_must_match_batch(am: AdaptedModel, batch: dict) -> None:
    with pytest.raises(XlpeftValueError, match="the batch has 2 examples but 3 setups were given"):
        am(**batch, adapters=["swh", "hin", "swh"])
    with pytest.raises(XlpeftValueError, match="the batch has 2 examples but 3 setups"):
        am(**batch, adapters=BatchSplit("swh", "hin", batch_sizes=[1, 2]))
    with pytest.raises(XlpeftTypeError, match=r"entry of a per-example `adapters` list can be .*; got list \['swh'\]"):
        am(**batch, adapters=[["swh"], "hin"])
    with pytest.raises(XlpeftValueError, match="BatchSplit inside it"):
        am(**batch, adapters=[BatchSplit("swh", batch_sizes=[1]), "hin"])
    am.set_active(BatchSplit("swh", "hin", batch_sizes=[2, 1]))
    with pytest.raises(XlpeftValueError, match="it has 3 setups but a layer saw a batch of 2 examples"):
        am(**batch)


def test_decoder_routing(batch: dict, am: AdaptedModel) -> None:
    with pytest.raises(XlpeftValueError, match="`decoder_adapters` needs an encoder-decoder model"):
        am(**batch, decoder_adapters=["swh", "hin"])
    s2s = AdaptedModel(tiny_model("t5", "seq2seq"))
    s2s.add_adapter("a")
    s2s_batch = tiny_batch(s2s.model, batch=2)
    with pytest.raises(XlpeftValueError, match="the batch has 2 examples but 1 setups"):
        s2s(**s2s_batch, adapters="a", decoder_adapters=["a"])


# ---------------------------------------------------------------- configs


def test_unknown_config_field() -> None:
    with pytest.raises(XlpeftKeyError, match=r"unknown field of LoRAConfig 'rank'; known: alpha, .*\br\b"):
        config_from_dict({"method": "lora", "rank": 3})
    with pytest.raises(XlpeftKeyError, match="unknown field of BottleneckConfig 'reduction'.*reduction_factor"):
        BottleneckConfig().replace(reduction=3)
    with pytest.raises(XlpeftKeyError, match="unknown field of LoRAConfig 'rank'"):
        config_from_dict({"method": "union", "configs": [{"method": "lora", "rank": 3}]})
    with pytest.raises(XlpeftKeyError, match="unknown adapter method 'lorra'.*Did you mean 'lora'"):
        config_from_dict({"method": "lorra"})
    with pytest.raises(XlpeftValueError, match="needs a 'method' key"):
        config_from_dict({"r": 3})


@pytest.mark.parametrize("make, message", [
    (lambda: BottleneckConfig(reduction_factor=-2), r"`reduction_factor` must be > 0; got -2"),
    (lambda: BottleneckConfig().replace(reduction_factor=0), r"`reduction_factor` must be > 0; got 0"),
    (lambda: InvertibleConfig(reduction_factor=-1), r"`reduction_factor` must be > 0"),
    (lambda: LoRAConfig(dropout=1.0), r"`dropout` must be in \[0, 1\); got 1.0"),
    (lambda: LoRAConfig().replace(dropout=-0.1), r"`dropout` must be in \[0, 1\)"),
    (lambda: LoRAConfig(r=0), r"`r` must be > 0; got 0"),
    (lambda: BottleneckConfig(mode="serial"), r"`mode` can be 'sequential', 'parallel'; got 'serial'"),
    (lambda: BottleneckConfig(placement=("fn",)), r"`placement` can be 'attn', 'ffn', 'cross'; got 'fn'"),
    (lambda: BottleneckConfig(non_linearity="relu6"), r"`non_linearity` can be 'relu', .*; got 'relu6'"),
    (lambda: IA3Config(input_scaled=("q",)), r"`input_scaled` can only name roles in `targets`"),
    (lambda: ConfigUnion(()), "needs at least one config"),
    (lambda: ConfigUnion((LoRAConfig(), LoRAConfig(r=2))), "can hold each method once"),
    (lambda: config_from_dict({"method": "bottleneck", "reduction_factor": -1}), "must be > 0"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_config_values(make, message: str) -> None:
    with pytest.raises(XlpeftValueError, match=message):
        make()


def test_union_members_must_be_single_method_configs() -> None:
    inner = ConfigUnion((LoRAConfig(),))
    with pytest.raises(XlpeftTypeError, match="ConfigUnion members can be single-method configs; got ConfigUnion"):
        ConfigUnion((inner,))


# ---------------------------------------------------------------- merging and state


def test_merge_errors(am: AdaptedModel) -> None:
    with pytest.raises(XlpeftValueError, match=r"adapter 'swh' \(bottleneck\) cannot be merged: merge works for "
                                               r"linear-point methods \(lora ungated, dora, vera, loha, lokr, ia3, bitfit\)"):
        am.merge("swh")
    am.merge("hin")
    with pytest.raises(XlpeftValueError, match="adapter 'hin' is already merged"):
        am.merge("hin")
    am.unmerge("hin")
    with pytest.raises(XlpeftValueError, match="adapter 'hin' is not merged"):
        am.unmerge("hin")


def test_load_state_dict_mismatch_changes_nothing(am: AdaptedModel) -> None:
    state = {k: v.clone() for k, v in am.adapter_state_dict("swh").items()}
    with pytest.raises(XlpeftValueError, match=r"adapter 'swh': tensors do not match its config; missing \["):
        am.load_adapter_state_dict("swh", {})
    bad = {k: torch.zeros(3) if i == 0 else v + 1 for i, (k, v) in enumerate(state.items())}
    with pytest.raises(XlpeftValueError, match=r"has shape \(3,\), expected"):
        am.load_adapter_state_dict("swh", bad)
    for k, v in am.adapter_state_dict("swh").items():
        assert torch.equal(v, state[k])
