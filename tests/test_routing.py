"""Per-example routing: a mixed batch equals each group run alone, in every
family, for every kind of adapter point; encoder and decoder route apart;
generation keeps beams with their example; gradients reach only the adapters
a batch uses and that were chosen to train.
"""

from __future__ import annotations

import pytest
import torch
from tiny import default_head as head, main_output as main, run, perturb, ALL_FAMILIES, ENCODER_FAMILIES, SEQ2SEQ_FAMILIES, tiny_batch, tiny_model

from xlpeft import AdaptedModel, Average, BatchSplit, Fuse, Stack
from xlpeft.methods import (
    BitFitConfig, BottleneckConfig, ConfigUnion, IA3Config, InvertibleConfig, LoRAConfig,
)

# Three adapters that between them use every point kind: sublayer (sequential
# and parallel), linear (LoRA, IA3 on inputs and outputs, BitFit), embed, lm_output.
CONFIGS = {
    "a": ConfigUnion((BottleneckConfig(reduction_factor=4, placement=("attn", "ffn", "cross")),
                      LoRAConfig(r=2, targets=("q", "v", "cross_k")))),
    "b": ConfigUnion((BottleneckConfig(reduction_factor=4, placement=("attn", "ffn"), mode="parallel"),
                      IA3Config(), BitFitConfig(targets=("o", "ffn_up")))),
    "c": ConfigUnion((BottleneckConfig(reduction_factor=2),
                      InvertibleConfig(stacks=("encoder", "decoder")))),
}
MIXED = ["a", "b", "a", Stack("c", "a"), Average("a", "b", weights=[0.3, 0.7]), Fuse("a", "c")]


def adapted(family: str, names=("a", "b", "c"), hd: str | None = None) -> AdaptedModel:
    am = AdaptedModel(tiny_model(family, hd or head(family)))
    for i, name in enumerate(names):
        am.add_adapter(name, CONFIGS[name])
        perturb(am, name, seed=i)
    return am


def rows(batch: dict, idx: list[int]) -> dict:
    return {k: v[idx] for k, v in batch.items()}


def groups(setups: list) -> dict:
    out: dict = {}
    for i, s in enumerate(setups):
        out.setdefault(s, []).append(i)
    return out


# ---------------------------------------------------------------- equivalence


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_mixed_batch_equals_each_group_alone(family: str) -> None:
    am = adapted(family)
    batch = tiny_batch(am.model, batch=len(MIXED))
    routed = run(am, batch, adapters=MIXED)
    outs = {}
    for setup, idx in groups(MIXED).items():
        outs[setup] = alone = run(am, rows(batch, idx), adapters=setup)
        torch.testing.assert_close(routed[idx], alone, rtol=1e-5, atol=1e-5)
    # the check can fail: the setups really differ on the same example
    assert (run(am, rows(batch, [0]), adapters="b") - outs["a"][:1]).abs().max() > 1e-3
    assert (outs[Fuse("a", "c")] - run(am, rows(batch, [5]), adapters=Stack("a", "c"))).abs().max() > 1e-4


@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
def test_encoder_and_decoder_route_apart(family: str) -> None:
    am = adapted(family)
    enc = ["a", "b", "a", "c"]
    dec = ["b", "b", "c", Stack("a", "c")]
    batch = tiny_batch(am.model, batch=4)
    routed = run(am, batch, adapters=enc, decoder_adapters=dec)
    for i in range(4):
        alone = run(am, rows(batch, [i]), adapters=enc[i], decoder_adapters=dec[i])
        torch.testing.assert_close(routed[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    same = run(am, batch, adapters=enc)  # decoder follows the encoder list
    assert (same - routed).abs().amax(dim=(1, 2))[[0, 2, 3]].min() > 1e-3
    torch.testing.assert_close(same[1:2], routed[1:2], rtol=1e-5, atol=1e-5)
    # only the decoder routed: the encoder runs the active setup
    am.set_active("a")
    dec_only = run(am, batch, decoder_adapters=dec)
    torch.testing.assert_close(dec_only[:1], run(am, rows(batch, [0]), adapters="a", decoder_adapters="b"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["xlm-roberta", "mbart", "t5"])
def test_batch_split_equals_per_example_list(family: str) -> None:
    am = adapted(family)
    batch = tiny_batch(am.model, batch=4)
    split = BatchSplit("a", Stack("c", "a"), "b", batch_sizes=[1, 2, 1])
    listed = run(am, batch, adapters=["a", Stack("c", "a"), Stack("c", "a"), "b"])
    torch.testing.assert_close(run(am, batch, adapters=split), listed, rtol=0, atol=0)
    am.set_active(split)  # an active BatchSplit routes every forward
    torch.testing.assert_close(run(am, batch), listed, rtol=0, atol=0)
    if family == "mbart":
        torch.testing.assert_close(run(am, batch, decoder_adapters=split),
                                   run(am, batch, adapters=split), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bert", "m2m_100", "mt5"])
def test_language_per_example_under_shared_task(family: str) -> None:
    am = AdaptedModel(tiny_model(family, head(family)))
    for i, (name, config) in enumerate({"x": "madx-language", "y": "madx-language", "task": "houlsby"}.items()):
        am.add_adapter(name, config)
        perturb(am, name, seed=10 + i)
    setups = [Stack("x", "task"), Stack("y", "task"), Stack("y", "task"), Stack("x", "task")]
    batch = tiny_batch(am.model, batch=4)
    routed = run(am, batch, adapters=setups)
    for setup, idx in groups(setups).items():
        am.set_active(setup)
        torch.testing.assert_close(routed[idx], run(am, rows(batch, idx)), rtol=1e-5, atol=1e-5)
    assert (routed[0] - run(am, rows(batch, [0]))).abs().max() > 1e-3  # y ≠ x on example 0


def test_routing_context_and_one_route_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    import xlpeft.core.model as model_module

    am = adapted("mbart")
    batch = tiny_batch(am.model, batch=3)
    calls = []
    real = model_module.route_for
    monkeypatch.setattr(model_module, "route_for", lambda *a: calls.append(a) or real(*a))
    expected = run(am, batch, adapters=["a", "b", "c"], decoder_adapters=["c", "a", "b"])
    assert len(calls) == 2  # encoder + decoder, however many points dispatch
    with am.routing(["a", "b", "c"], ["c", "a", "b"], batch_size=3):
        torch.testing.assert_close(run(am.model, batch), expected, rtol=0, atol=0)
    assert am.state.routes is None  # the context restores the state


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
def test_generate_routes_per_example(family: str, num_beams: int) -> None:
    am = AdaptedModel(tiny_model(family, "seq2seq"))
    for i, name in enumerate(("a", "b")):
        am.add_adapter(name, "houlsby")
        perturb(am, name, scale=1.0, seed=i)
    batch = tiny_batch(am.model, batch=4)
    batch.pop("decoder_input_ids")
    enc, dec = ["a", "b", "b", "a"], ["b", "b", "a", "a"]
    kw = dict(max_new_tokens=4, min_new_tokens=4, num_beams=num_beams, do_sample=False,
              return_dict_in_generate=True, output_scores=True)
    routed = am.generate(**batch, adapters=enc, decoder_adapters=dec, **kw)
    for pair, idx in groups(list(zip(enc, dec))).items():
        alone = am.generate(**rows(batch, idx), adapters=pair[0], decoder_adapters=pair[1], **kw)
        assert torch.equal(routed.sequences[idx], alone.sequences), pair
        if num_beams == 1:  # per-step logits: a much finer check than tokens
            for r, a in zip(routed.scores, alone.scores):
                torch.testing.assert_close(r[idx], a, rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(routed.sequences_scores[idx], alone.sequences_scores,
                                       rtol=1e-4, atol=1e-4)
    plain = am.generate(**batch, adapters="a", decoder_adapters="a", **kw)
    assert not torch.equal(plain.sequences, routed.sequences)  # routing matters here


# ---------------------------------------------------------------- gradients


def backward(am: AdaptedModel, batch: dict, **kw) -> None:
    am.zero_grad(set_to_none=True)
    main(am(**batch, **kw)).pow(2).mean().backward()


def grads(am: AdaptedModel, name: str) -> list[torch.Tensor | None]:
    return [p.grad for m in am.adapter_modules(name) for p in m.parameters()]


def assert_backbone_has_no_grad(am: AdaptedModel) -> None:
    assert all(p.grad is None and not p.requires_grad for p in am.model.parameters())


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_gradients_only_for_trained_adapters_in_the_batch(family: str) -> None:
    am = adapted(family)
    batch = tiny_batch(am.model, batch=4)

    am.train_adapters("a")
    backward(am, batch, adapters=["a", "b", Stack("c", "a"), "b"])
    assert all(g is not None and g.abs().sum() > 0 for g in grads(am, "a"))
    assert all(g is None for g in grads(am, "b") + grads(am, "c"))
    assert_backbone_has_no_grad(am)

    am.train_adapters("a", "b")
    backward(am, batch, adapters=["a", "a", "c", "a"])  # b trains but is not in the batch
    assert all(g is not None and g.abs().sum() > 0 for g in grads(am, "a"))
    assert all(g is None or not g.any() for g in grads(am, "b"))
    assert all(g is None for g in grads(am, "c"))
    assert_backbone_has_no_grad(am)


@pytest.mark.parametrize("family", ["bert", "t5", "marian"])
def test_training_a_fuse_trains_only_fusion_layers(family: str) -> None:
    am = adapted(family)
    fuse = Fuse("a", "b")
    am.train_adapters(fuse)
    fusion = [p for point in am.points.values() for f in getattr(point, "fusions", {}).values()
              for p in f.parameters()]
    assert fusion and all(p.requires_grad for p in fusion)
    trainable = {id(p) for p in am.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in fusion}
    batch = tiny_batch(am.model, batch=2)
    backward(am, batch, adapters=[fuse, "c"])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion)
    assert all(g is None for n in ("a", "b", "c") for g in grads(am, n))
    assert_backbone_has_no_grad(am)
    report = am.parameter_report()
    assert [(r.name, r.method, r.trainable) for r in report.fusions] == [
        ("a+b", "fusion", sum(p.numel() for p in fusion))]
    assert all(r.trainable == 0 for r in report.adapters)


@pytest.mark.parametrize("family", ["bert", "mbart", "t5"])
def test_activation_checkpointing_keeps_routing(family: str) -> None:
    """Backward re-runs checkpointed blocks after the forward's routing has ended."""
    results = []
    for checkpointing in (False, True):
        am = adapted(family)
        am.train_adapters("a", "b", "c")
        if checkpointing:
            am.activation_checkpointing_enable()
        am.train()  # checkpointing only runs in training mode
        torch.manual_seed(1)  # same dropout masks (checkpointing replays the RNG)
        backward(am, tiny_batch(am.model, batch=4), adapters=["a", "b", Stack("c", "a"), "b"])
        results.append([g for n in ("a", "b", "c") for g in grads(am, n)])
    for plain, checkpointed in zip(*results):
        assert checkpointed is not None
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)


def test_fusion_made_by_routing_is_frozen_until_trained() -> None:
    """A fusion layer made by routing mid-training is frozen; train_adapters(Fuse) unfreezes it."""
    am = adapted("bert")
    am.train_adapters("a")
    batch = tiny_batch(am.model, batch=2)
    backward(am, batch, adapters=[Fuse("a", "b"), "a"])
    fusion = [p for point in am.points.values() for f in getattr(point, "fusions", {}).values()
              for p in f.parameters()]
    assert fusion and all(not p.requires_grad and p.grad is None for p in fusion)
    assert all(g is not None for g in grads(am, "a")) and all(g is None for g in grads(am, "b"))
    am.train_adapters(Fuse("a", "b"), "a")
    assert all(p.requires_grad for p in fusion)
    assert all(p.requires_grad for m in am.adapter_modules("a") for p in m.parameters())
