"""Ladder Side-Tuning (Sung et al. 2022): the side network by hand, no backprop into the backbone, files."""

from __future__ import annotations

import pytest
import torch
from tiny import HIDDEN, LAYERS, tiny_batch, tiny_model

from xlpeft import AdaptedModel
from xlpeft.errors import XlpeftValueError
from xlpeft.methods import LadderConfig, LadderSideTuning, preset
from xlpeft.methods.ladder import LadderSideNetwork, mean_pool

CONFIG = LadderConfig(reduction_factor=4, heads=2)
WIDTH = HIDDEN // 4


def _perturbed(config: LadderConfig = CONFIG) -> LadderSideTuning:
    lst = LadderSideTuning(tiny_model("bert"), config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lst.side.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return lst


def test_starts_at_the_backbone_output_and_matches_the_ladder_by_hand() -> None:
    fresh = LadderSideTuning(tiny_model("bert"), CONFIG).eval()
    batch = tiny_batch(fresh.backbone)
    with torch.no_grad():
        bare = fresh.backbone(**batch).last_hidden_state
        assert torch.equal(fresh(**batch), bare)  # up starts at zero
        lst = _perturbed()
        hs = lst.backbone(**batch, output_hidden_states=True).hidden_states
        side, pad = lst.side, batch["attention_mask"] == 0
        s = side.downs[0](hs[0])
        for i in range(LAYERS):
            mu = torch.sigmoid(side.gates[i] / 0.1)
            s = side.blocks[i](mu * side.downs[i + 1](hs[i + 1]) + (1 - mu) * s, src_key_padding_mask=pad)
        expected = hs[-1] + side.up(s)
        got = lst(**batch)
    assert (got - expected).abs().max() <= 1e-5 and (got - bare).abs().max() > 1e-2


def test_no_gradient_and_no_saved_activation_in_the_backbone() -> None:
    lst = _perturbed().train()
    batch = tiny_batch(lst.backbone)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = lst(**batch)
    with torch.no_grad():
        hs = lst.backbone(**batch, output_hidden_states=True).hidden_states
    side_only = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: side_only.append(t.numel()) or t, lambda t: t):
        lst.side(hs, batch["attention_mask"])
    assert sum(saved) == sum(side_only) > 0  # everything kept for backward belongs to the side network
    mean_pool(out, batch["attention_mask"]).square().sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in lst.backbone.parameters())
    assert all(p.grad is not None for p in lst.side.parameters())


def test_state_dict_round_trip_through_an_adapter_directory(tmp_path) -> None:
    from xlpeft.ops.files import read_weights, write_directory
    lst = _perturbed()
    batch = tiny_batch(lst.backbone)
    write_directory(tmp_path / "side", {"config": CONFIG.to_dict(), "backbone": {}},
                    {k: v.contiguous() for k, v in lst.side.state_dict().items()})
    fresh = LadderSideTuning(tiny_model("bert"), CONFIG).eval()
    fresh.side.load_state_dict(read_weights(tmp_path / "side"))
    with torch.no_grad():
        assert torch.equal(fresh(**batch), lst(**batch))


def test_parameter_count_follows_the_formula() -> None:
    side = LadderSideNetwork(HIDDEN, LAYERS, CONFIG)
    w, d, n = WIDTH, HIDDEN, LAYERS
    block = 12 * w * w + 13 * w  # attention (4w² + 4w), FFN w→4w→w (8w² + 5w), two norms (4w)
    expected = (n + 1) * (d * w + w) + n + n * block + (w * d + d)
    assert sum(p.numel() for p in side.parameters()) == expected


def test_cannot_be_an_adapter_or_route() -> None:
    am = AdaptedModel(tiny_model("bert"))
    before = {k: v.clone() for k, v in am.state_dict().items()}
    with pytest.raises(XlpeftValueError, match="cannot be added with add_adapter, routed per example or merged"):
        am.add_adapter("side", CONFIG)
    assert not am.configs and not am.points and before.keys() == am.state_dict().keys()
    with pytest.raises(XlpeftValueError, match="`heads` must divide the side width 8"):
        LadderSideNetwork(HIDDEN, LAYERS, LadderConfig(reduction_factor=4, heads=3))
    with pytest.raises(XlpeftValueError, match="reads 3 hidden states"):
        LadderSideNetwork(HIDDEN, LAYERS, CONFIG)([torch.zeros(1, 2, HIDDEN)])
    assert preset("ladder") == LadderConfig(reduction_factor=8)


def test_a_t5_encoder_backbone() -> None:
    from tiny import tiny_config
    from transformers import T5EncoderModel
    torch.manual_seed(0)
    encoder = T5EncoderModel(tiny_config("t5")).eval()
    lst = LadderSideTuning(encoder, CONFIG).eval()
    batch = {k: v for k, v in tiny_batch(tiny_model("t5")).items() if not k.startswith("decoder")}
    with torch.no_grad():
        assert torch.equal(lst(**batch), encoder(**batch).last_hidden_state)
