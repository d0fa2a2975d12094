"""Every built-in layout against tiny random models of every family and head class."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2Model, T5Config, T5EncoderModel, T5ForConditionalGeneration
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tiny import HIDDEN, LAYERS, tiny_batch, tiny_config, tiny_model
from xlpeft.backbones import layouts
from xlpeft.backbones.layout import Layout, StackLayout
from xlpeft.backbones.layouts import (
    LAYOUTS, get_module, join, layout_for, lm_output_path, pattern_targets, register_layout,
)
from xlpeft.errors import XlpeftKeyError, XlpeftTypeError, XlpeftValueError

BLOCK_POINTS = ("attn_in", "attn_out", "ffn_in", "ffn_out", "attn", "cross_in", "cross_out", "cross_attn")


def _first(x: object) -> torch.Tensor:
    """The main tensor of a model output (logits, or the last hidden state)."""
    return x.to_tuple()[0] if hasattr(x, "to_tuple") else x[0] if isinstance(x, (tuple, list)) else x


def _blocks(model: nn.Module, stack: StackLayout) -> nn.ModuleList:
    return get_module(model.base_model, stack.layers)


def _lengths(model: nn.Module, batch: dict) -> dict[str, int]:
    decoder_ids = batch.get("decoder_input_ids", batch["input_ids"])
    return {"encoder": batch["input_ids"].shape[1], "decoder": decoder_ids.shape[1]}


def test_paths_resolve(family_head: tuple[str, str]) -> None:
    family, head = family_head
    model = tiny_model(family, head)
    layout = layout_for(model)
    base = model.base_model
    assert layout.family == family
    assert set(layout.stacks) == ({"encoder", "decoder"} if "decoder_input_ids" in tiny_batch(model) else {"encoder"})
    assert get_module(base, layout.word_embeddings) is model.get_input_embeddings()
    for name, stack in layout.stacks.items():
        assert stack.embed.startswith(stack.root), "embed lies inside root, so the root pre-hook runs first"
        get_module(base, stack.root)
        assert isinstance(get_module(base, stack.embed), nn.Module)
        blocks = _blocks(model, stack)
        assert isinstance(blocks, nn.ModuleList) and len(blocks) == LAYERS
        has_cross = stack.cross_attn is not None
        assert has_cross == (name == "decoder")
        cross_roles = {r for r in stack.linears if r.startswith("cross_")}
        assert cross_roles == ({"cross_q", "cross_k", "cross_v", "cross_o"} if has_cross else set())
        for block in blocks:
            for point in BLOCK_POINTS:
                if getattr(stack, point) is not None:
                    get_module(block, getattr(stack, point))
            for role, paths in stack.linears.items():
                assert all(isinstance(get_module(block, p), nn.Linear) for p in paths), role
    ups = layout.stacks["encoder"].linears["ffn_up"]
    assert len(ups) == (2 if family == "mt5" else 1)
    lm = lm_output_path(model, layout)
    if head in ("masked-lm", "seq2seq") or family == "encoder-decoder":  # EncoderDecoderModel always has one
        assert lm is not None and model.get_submodule(lm) is model.get_output_embeddings()
    else:
        assert lm is None


def test_sublayer_shapes_and_attention_modules(
    family_head: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """attn_in/ffn_in/cross_in get a [B, T, H] first input and *_out give [B, T, H]; attn/cross_attn call
    the attention function; root pre-hooks and embed outputs fire once per stack."""
    family, head = family_head
    model = tiny_model(family, head)
    layout = layout_for(model)
    batch = tiny_batch(model)
    lengths = _lengths(model, batch)
    seen: list[tuple[str, str, tuple[int, ...]]] = []
    handles = []

    def pre(stack: str, point: str):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            seen.append((stack, point, tuple(x.shape)))
        return hook

    def post(stack: str, point: str):
        def hook(_m, _args, out):
            assert isinstance(out, torch.Tensor), f"{stack}.{point} output is {type(out).__name__}"
            seen.append((stack, point, tuple(out.shape)))
        return hook

    base = model.base_model
    for name, stack in layout.stacks.items():
        root_hook = (lambda n: lambda _m, _a: seen.append((n, "root", ())))(name)
        handles.append(get_module(base, stack.root).register_forward_pre_hook(root_hook))
        handles.append(get_module(base, stack.embed).register_forward_hook(post(name, "embed")))
        for block in _blocks(model, stack):
            for point in ("attn_in", "ffn_in", "cross_in"):
                if getattr(stack, point):
                    module = get_module(block, getattr(stack, point))
                    handles.append(module.register_forward_pre_hook(pre(name, point), with_kwargs=True))
            for point in ("attn_out", "ffn_out", "cross_out"):
                if getattr(stack, point):
                    handles.append(get_module(block, getattr(stack, point)).register_forward_hook(post(name, point)))

    attn_modules = {
        id(get_module(block, path)): f"{name}.{point}"
        for name, stack in layout.stacks.items() for block in _blocks(model, stack)
        for point, path in (("attn", stack.attn), ("cross_attn", stack.cross_attn)) if path
    }
    called: list[str] = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, *args, **kwargs):
        called.append(attn_modules.get(id(module), f"unlisted {type(module).__name__}"))
        return sdpa(module, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", spy)
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()

    b = batch["input_ids"].shape[0]
    expected = []
    for name, stack in layout.stacks.items():
        roots = [s for s in seen if s[:2] == (name, "root")]
        assert len(roots) == 1, f"{name} root ran {len(roots)} times"
        assert [s[2] for s in seen if s[:2] == (name, "embed")] == [(b, lengths[name], HIDDEN)]
        for point in ("attn_in", "attn_out", "ffn_in", "ffn_out", "cross_in", "cross_out"):
            if getattr(stack, point):
                got = [s[2] for s in seen if s[:2] == (name, point)]
                assert got == [(b, lengths[name], HIDDEN)] * LAYERS, f"{name}.{point}: {got}"
        expected += [f"{name}.attn"] * LAYERS + ([f"{name}.cross_attn"] * LAYERS if stack.cross_attn else [])
    assert sorted(called) == sorted(expected)


def test_points_are_live(family_head: tuple[str, str]) -> None:
    """Adding a constant vector at attn_out/ffn_out/cross_out of the last block of each stack changes the
    model output.

    The vector varies over features: a shift equal in every feature would vanish in the LayerNorm that
    follows the residual add in post-LN families (BERT, Marian)."""
    family, head = family_head
    model = tiny_model(family, head)
    layout = layout_for(model)
    batch = tiny_batch(model)
    with torch.no_grad():
        ref = _first(model(**batch))
    shift = torch.linspace(-1.0, 1.0, HIDDEN)
    for stack in layout.stacks.values():
        for point in ("attn_out", "ffn_out", "cross_out"):
            if getattr(stack, point) is None:
                continue
            module = get_module(_blocks(model, stack)[-1], getattr(stack, point))
            handle = module.register_forward_hook(lambda _m, _a, out: out + shift)
            with torch.no_grad():
                out = _first(model(**batch))
            handle.remove()
            assert not torch.allclose(out, ref), f"{stack.root}.{point} is dead"
    with torch.no_grad():
        assert torch.equal(_first(model(**batch)), ref), "hooks were not removed cleanly"


def test_deterministic(family: str) -> None:
    """Same seed, same model, same batch → bit-identical outputs (sdpa on CPU)."""
    a, b = tiny_model(family), tiny_model(family)
    batch = tiny_batch(a)
    with torch.no_grad():
        assert torch.equal(_first(a(**batch)), _first(b(**batch)))


def test_encoder_only_variant_drops_the_decoder_stack() -> None:
    model = T5EncoderModel(tiny_config("t5"))
    layout = layout_for(model)
    assert layout.family == "t5" and list(layout.stacks) == ["encoder"]
    assert set(LAYOUTS["t5"].stacks) == {"encoder", "decoder"}, "the registry entry is untouched"


def test_gated_t5_picks_t5_gated() -> None:
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    layout = layout_for(T5ForConditionalGeneration(config))
    assert layout.family == "t5-gated"
    assert layout.stacks["decoder"].linears["ffn_up"] == ("layer.2.DenseReluDense.wi_0", "layer.2.DenseReluDense.wi_1")


def test_join_and_get_module() -> None:
    model = tiny_model("bert", "masked-lm")
    assert join("bert", "", "encoder") == "bert.encoder"
    assert get_module(model.base_model, "") is model.bert
    with pytest.raises(AttributeError):
        get_module(model, "nope.nothing")


# --------------------------------------------------------------------------- registry and errors


def _gpt2() -> GPT2Model:
    return GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def _gpt2_layout(family: str = "gpt2-test", layers: str = "h") -> Layout:
    stack = StackLayout(root="", layers=layers, embed="wte", attn_in="attn", attn_out="attn.c_proj",
                        ffn_in="mlp", ffn_out="mlp", attn="attn")
    return Layout(family=family, model_types=("gpt2",), stacks={"decoder": stack}, word_embeddings="wte")


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, Layout]:
    """A private copy of the registry, so tests may register freely."""
    copy = dict(LAYOUTS)
    monkeypatch.setattr(layouts, "LAYOUTS", copy)
    return copy


def test_unknown_model_type_lists_supported_types() -> None:
    with pytest.raises(XlpeftKeyError, match=r"unknown model_type 'gpt2'.*bert.*m2m_100.*Layout.*register_layout"):
        layout_for(_gpt2())


def test_not_a_model() -> None:
    with pytest.raises(XlpeftTypeError, match="PreTrainedModel"):
        layout_for(nn.Linear(2, 2))


def test_register_custom_layout(registry: dict[str, Layout]) -> None:
    layout = register_layout(_gpt2_layout())
    assert layout_for(_gpt2()) is layout and "gpt2-test" in registry
    with pytest.raises(XlpeftValueError, match="already registered.*replace=True"):
        register_layout(_gpt2_layout())
    register_layout(_gpt2_layout(), replace=True)


def test_later_registration_wins_and_mismatch_is_reported(registry: dict[str, Layout]) -> None:
    register_layout(_gpt2_layout("gpt2-broken", layers="blocks"))
    with pytest.raises(XlpeftValueError, match=r"does not match any registered layout.*'gpt2-broken' lacks blocks"):
        layout_for(_gpt2())
    good = register_layout(_gpt2_layout("gpt2-good"))
    assert layout_for(_gpt2()) is good


def test_register_rejects_bad_roles(registry: dict[str, Layout]) -> None:
    stack = StackLayout(root="", layers="h", embed="wte", attn_in="attn", attn_out="attn.c_proj",
                        ffn_in="mlp", ffn_out="mlp", attn="attn", linears={"query": ("attn.c_attn",)})
    with pytest.raises(XlpeftKeyError, match="unknown linear role 'query'; known: .*ffn_up"):
        register_layout(Layout("bad", ("gpt2",), {"decoder": stack}, "wte"))
    stack = StackLayout(root="", layers="h", embed="wte", attn_in="attn", attn_out="attn.c_proj",
                        ffn_in="mlp", ffn_out="mlp", attn="attn", linears={"q": "attn.c_attn"})
    with pytest.raises(XlpeftValueError, match="tuple of paths"):
        register_layout(Layout("bad", ("gpt2",), {"decoder": stack}, "wte"))


# --------------------------------------------------------------------------- pattern_targets


def test_pattern_targets() -> None:
    model = tiny_model("bert", "masked-lm")
    names = pattern_targets(model, [r".*\.query", r".*attention\.self\.value"])
    assert names == [
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value",
    ]
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in names)
    assert pattern_targets(model, r"cls\.predictions\.decoder") == ["cls.predictions.decoder"]
    t5 = tiny_model("mt5", "seq2seq")
    assert len(pattern_targets(t5, [r"decoder\.block\.\d+\.layer\.2\.DenseReluDense\.wi_[01]"])) == 2 * LAYERS


def test_pattern_targets_errors() -> None:
    model = tiny_model("bert")
    with pytest.raises(XlpeftKeyError, match=r"'qury' matches no nn.Linear.*fullmatch.*'query'"):
        pattern_targets(model, ["qury"])
    with pytest.raises(XlpeftKeyError, match="'query' matches no"):  # fullmatch: a bare leaf name is not enough
        pattern_targets(model, [r".*\.key", "query"])
    with pytest.raises(XlpeftValueError, match="not a valid regular expression"):
        pattern_targets(model, ["(unclosed"])
    with pytest.raises(XlpeftValueError, match="at least one pattern"):
        pattern_targets(model, [])
