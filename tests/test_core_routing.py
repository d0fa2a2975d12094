"""Routing that belongs to its call: threads and asyncio tasks route apart, checkpointed
blocks keep their routing however checkpointing was enabled, a new per-example mix
reuses the compiled graph, routing arguments are checked, and the vocabulary switch
is a child of its model that reads ids without a host sync.
"""

from __future__ import annotations

import asyncio
import threading
import warnings

import pytest
import torch
from tiny import default_head as head, main_output as main, perturb, tiny_batch, tiny_model

from xlpeft import AdaptedModel, Stack
from xlpeft.errors import XlpeftTypeError, XlpeftValueError
from xlpeft.methods import BottleneckConfig, ConfigUnion, IA3Config, LoRAConfig, PrefixConfig

CONFIGS = {  # sublayer (sequential and parallel: a captured input), linear, attention points
    "a": ConfigUnion((BottleneckConfig(reduction_factor=4), LoRAConfig(r=2, targets=("q", "v")))),
    "b": ConfigUnion((BottleneckConfig(reduction_factor=4, mode="parallel"), IA3Config())),
    "p": PrefixConfig(prefix_length=3),
}
MIXES = [["a", "b", "a", "b"], ["b", "b", "a", "a"], ["a", "a", "a", "b"],
         ["b", "a", "b", "b"], ["a", "b", "b", "a"], ["b", "a", "a", "a"]]


def adapted(family: str, names=("a", "b", "p")) -> AdaptedModel:
    am = AdaptedModel(tiny_model(family, head(family)))
    for i, name in enumerate(names):
        am.add_adapter(name, CONFIGS[name])
        perturb(am, name, seed=i)
    return am


def routes(n: int) -> list[list]:
    """``n`` different routing lists over four examples."""
    pool = ["a", "b", "p", Stack("p", "a")]
    return [[pool[(i + j) % 4] if (i >> j) & 1 else pool[(i * 3 + j) % 4] for j in range(4)]
            for i in range(n)]


# ---------------------------------------------------------------- threads and tasks


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_two_threads_routing_one_model_get_the_single_thread_outputs(family: str) -> None:
    am = adapted(family)
    batch = tiny_batch(am.model, batch=4)
    plan = routes(30)
    with torch.no_grad():
        expected = [main(am(**batch, adapters=r)) for r in plan]
    got: dict[int, torch.Tensor] = {}
    start = threading.Barrier(2)

    def work(indices: range) -> None:
        start.wait()
        with torch.no_grad():
            for i in indices:
                got[i] = main(am(**batch, adapters=plan[i]))

    threads = [threading.Thread(target=work, args=(range(k, 30, 2),)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wrong = [i for i in range(30) if not torch.allclose(got[i], expected[i], rtol=1e-5, atol=1e-6)]
    assert len(got) == 30 and wrong == []


def test_asyncio_tasks_routing_one_model_stay_apart() -> None:
    """Each task's routing block spans an await; the other task routes meanwhile."""
    am = adapted("bert")
    batch = tiny_batch(am.model, batch=4)
    plan = routes(8)
    with torch.no_grad():
        expected = [main(am(**batch, adapters=r)) for r in plan]

    async def one(i: int) -> torch.Tensor:
        with am.routing(plan[i]):
            await asyncio.sleep(0)  # the other tasks enter their own routing here
            with torch.no_grad():
                return main(am.model(**batch))

    async def all_of() -> list[torch.Tensor]:
        return await asyncio.gather(*(one(i) for i in range(8)))

    for got, want in zip(asyncio.run(all_of()), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- checkpointing


def _grads(family: str, enable) -> list[torch.Tensor]:
    am = adapted(family)
    am.train_adapters("a", "b", "p")
    enable(am)
    am.train()
    torch.manual_seed(1)  # same dropout masks (checkpointing replays the RNG)
    batch = tiny_batch(am.model, batch=4)
    main(am(**batch, adapters=["a", "b", Stack("p", "a"), "b"])).pow(2).mean().backward()
    grads = [p.grad for n in ("a", "b", "p") for m in am.adapter_modules(n) for p in m.parameters()]
    assert all(g is not None for g in grads)
    return grads


def _hf_enable(**kwargs):
    def enable(am: AdaptedModel) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias is what users call
            am.model.gradient_checkpointing_enable(**kwargs)
    return enable


def _wrapper_enable(am: AdaptedModel) -> None:
    """What a strategy's activation-checkpointing policy does (Lightning FSDP)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    block = type(am.backbone.blocks(next(iter(am.backbone.stacks)))[0])
    apply_activation_checkpointing(am.model, check_fn=lambda m: isinstance(m, block))


@pytest.mark.parametrize("family", ["bert", "t5"])
@pytest.mark.parametrize("how", ["hf", "hf-reentrant", "checkpoint_wrapper", "xlpeft"])
def test_routed_backward_survives_checkpointing_however_enabled(family: str, how: str) -> None:
    enable = {"hf": _hf_enable(), "checkpoint_wrapper": _wrapper_enable,
              "hf-reentrant": _hf_enable(gradient_checkpointing_kwargs={"use_reentrant": True}),
              "xlpeft": lambda am: am.activation_checkpointing_enable()}[how]
    if how == "checkpoint_wrapper" and family == "t5":
        pytest.skip("a bare T5 fails under torch's checkpoint_wrapper (CheckpointError), adapters or not")
    plain = _grads(family, lambda am: None)
    for got, want in zip(_grads(family, enable), plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- torch.compile


class GraphCounter:
    """A dynamo backend that counts the graphs it is given and runs them as they are."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("what", ["inner model in routing()", "AdaptedModel with adapters="])
def test_new_mixes_of_the_same_adapters_reuse_the_compiled_graph(what: str) -> None:
    am = adapted("bert", names=("a", "b"))
    batch = tiny_batch(am.model, batch=4)
    torch._dynamo.reset()
    counter = GraphCounter()
    compiled = torch.compile(am.model if what.startswith("inner") else am, backend=counter, dynamic=False)
    try:
        for mix in MIXES:
            with torch.no_grad():
                if what.startswith("inner"):
                    with am.routing(mix):
                        out = main(compiled(**batch))
                else:
                    out = main(compiled(**batch, adapters=mix))
            with torch.no_grad():
                torch.testing.assert_close(out, main(am(**batch, adapters=mix)), rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
    assert 1 <= counter.graphs <= 2


def test_compiled_inner_model_without_routing_runs_the_active_setup() -> None:
    """No call frame: each stack root opens its own, also in compiled code (a parallel adapter's capture)."""
    am = adapted("bert", names=("a", "b"))
    am.set_active(Stack("b", "a"))
    batch = tiny_batch(am.model, batch=2)
    torch._dynamo.reset()
    counter = GraphCounter()
    compiled = torch.compile(am.model, backend=counter, dynamic=False)
    try:
        with torch.no_grad():
            torch.testing.assert_close(main(compiled(**batch)), main(am.model(**batch)), rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
    assert counter.graphs == 1


def test_compiled_routed_training_step_has_eager_gradients() -> None:
    am = adapted("bert", names=("a", "b"))
    am.train_adapters("a", "b")
    batch = tiny_batch(am.model, batch=4)
    torch._dynamo.reset()
    counter = GraphCounter()
    compiled = torch.compile(am.model, backend=counter, dynamic=False)
    params = [p for p in am.parameters() if p.requires_grad]
    try:
        for mix in MIXES[:3]:
            grads = []
            for model in (compiled, am.model):
                am.zero_grad(set_to_none=True)
                with am.routing(mix):
                    main(model(**batch)).pow(2).mean().backward()
                grads.append([p.grad.clone() for p in params])
            for got, want in zip(*grads):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    finally:
        torch._dynamo.reset()
    assert 1 <= counter.graphs <= 2


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize("bad", [{"a", "b"}, {"a": 0, "b": 1}, torch.tensor([0, 1])],
                         ids=["set", "dict", "tensor"])
def test_routing_arguments_of_the_wrong_type_are_named(bad) -> None:
    am = adapted("bert", names=("a", "b"))
    batch = tiny_batch(am.model, batch=2)
    with pytest.raises(XlpeftTypeError, match=f"got {type(bad).__name__}"):
        am(**batch, adapters=bad)


def test_a_routing_list_must_match_the_batch() -> None:
    am = adapted("bert", names=("a", "b"))
    batch = tiny_batch(am.model, batch=4)
    with pytest.raises(XlpeftValueError, match="it has 2 setups but a layer saw a batch of 4"):
        with am.routing(["a", "b"]):
            am.model(**batch)
    with pytest.raises(XlpeftValueError, match="the batch has 4 examples but 2 setups were given"):
        am(**batch, adapters=["a", "b"])
    with pytest.raises(XlpeftValueError, match="the batch has 4 examples but 2 setups were given"):
        with am.routing(["a", "b"], batch_size=4):
            pass


def test_an_empty_name_in_a_routing_list_is_refused() -> None:
    am = adapted("bert", names=("a", "b"))
    batch = tiny_batch(am.model, batch=2)
    with pytest.raises(XlpeftValueError, match="non-empty name; got '' at position 1"):
        am(**batch, adapters=["a", ""])


def test_generate_inside_routing_expands_beams_of_the_declared_batch() -> None:
    am = adapted("t5", names=("a", "b"))
    batch = tiny_batch(am.model, batch=2)
    batch.pop("decoder_input_ids")
    kw = dict(max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=False)
    direct = am.generate(**batch, adapters=["a", "b"], **kw)
    with am.routing(["a", "b"]):
        inside = am.generate(**batch, **kw)
    assert torch.equal(direct, inside)


# ---------------------------------------------------------------- vocabulary switch


def _switch_model():
    from xlpeft.vocab import NewVocabConfig, VocabularySwitch
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    am.add_adapter("sat", "pfeiffer")
    switch = VocabularySwitch(am)
    old = am.backbone.vocab_size
    switch.add("sat", {i: i for i in range(10)}, 5, NewVocabConfig(vocab_size=5, factor_dim=4))
    return am, switch, old


def test_the_vocabulary_switch_is_a_child_of_its_model() -> None:
    from xlpeft.vocab import VocabularySwitch
    am, switch, _ = _switch_model()
    assert am.vocabulary_switch is switch and VocabularySwitch.of(am) is switch
    assert any(k.startswith("vocabulary.vocabs.sat.") for k in am.state_dict())
    with pytest.raises(XlpeftValueError, match="already has an attached VocabularySwitch"):
        VocabularySwitch(am)
    switch.detach()
    assert am.vocabulary_switch is None and not any(k.startswith("vocabulary.") for k in am.state_dict())


def test_routed_new_vocabulary_embedding_reads_no_scalar_from_the_device() -> None:
    """``int(ids.max())`` would be a host sync (``_local_scalar_dense``) on every forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoScalarReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                raise AssertionError("a tensor was read back to the host")
            return func(*args, **(kwargs or {}))

    am, _, old = _switch_model()
    ids = torch.tensor([[2, old + 1, 3], [old + 4, 5, 6]])
    embedding = am.model.get_input_embeddings()
    with am.routing(["sat", "sat"]), torch.no_grad():
        with NoScalarReads():
            out = embedding(ids)
        plain = embedding(ids.clamp(max=old - 1))
    assert out.shape == plain.shape and not torch.equal(out[0, 1], plain[0, 1])


def test_train_adapters_leaves_the_vocabulary_switch_trainability_alone() -> None:
    """The switch became a child of the model: freezing "everything else" must not reach it."""
    am, switch, _ = _switch_model()
    switch.vocabs["sat"].requires_grad_(True)
    am.train_adapters("sat")
    assert switch.vocabs["sat"].F.requires_grad
    assert all(not p.requires_grad for p in am.model.parameters())
