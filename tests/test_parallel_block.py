"""The ``Parallel`` block: the batch through every branch, outputs stacked on the batch dimension."""

from __future__ import annotations

import pytest
import torch

from tiny import tiny_batch, tiny_model
from xlpeft import AdaptedModel, Average, BatchSplit, Fuse, Parallel, Stack
from xlpeft.errors import XlpeftValueError


def randomised(model: AdaptedModel, *names: str) -> AdaptedModel:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in names:
            for module in model.adapter_modules(name):
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def model_with(family: str = "bert", head: str = "base") -> AdaptedModel:
    model = AdaptedModel(tiny_model(family, head))
    model.add_adapter("a", "pfeiffer")
    model.add_adapter("b", "lora")
    model.add_adapter("c", "prefix")
    return randomised(model, "a", "b", "c")


def run(model: AdaptedModel, batch: dict, setup=None, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch, adapters=setup, **kw) if setup is not None else model(**batch, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize(("family", "head"), [("bert", "base"), ("xlm-roberta", "seq-cls"), ("t5", "seq2seq")])
def test_rows_equal_each_branch_alone(family: str, head: str) -> None:
    model = model_with(family, head)
    batch = tiny_batch(model.model)
    n = batch["input_ids"].shape[0]
    alone = [run(model, batch, s) for s in ("a", "b", Stack("a", "c"))]
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # the branches differ
    together = run(model, batch, Parallel("a", "b", Stack("a", "c")))
    assert together.shape[0] == 3 * n
    for i, expected in enumerate(alone):
        torch.testing.assert_close(together[i * n:(i + 1) * n], expected, atol=1e-5, rtol=1e-5)
    model.set_active(Parallel("b", "a"))  # the active setup works the same way
    active = run(model, batch)
    torch.testing.assert_close(active, torch.cat([alone[1], alone[0]]), atol=1e-5, rtol=1e-5)


def test_stack_around_parallel_is_distributed() -> None:
    model = model_with()
    batch = tiny_batch(model.model)
    expected = torch.cat([run(model, batch, Stack("a", "b")), run(model, batch, Stack("a", "c"))])
    torch.testing.assert_close(run(model, batch, Stack("a", Parallel("b", "c"))), expected, atol=1e-5, rtol=1e-5)
    expected = torch.cat([run(model, batch, Stack("a", "b", "c")), run(model, batch, Stack("a", "c"))])
    torch.testing.assert_close(run(model, batch, Stack("a", Parallel(Stack("b", "c"), "c"))), expected,
                               atol=1e-5, rtol=1e-5)


def test_loss_and_gradients_reach_every_branch() -> None:
    model = model_with("bert", "seq-cls")
    batch = tiny_batch(model.model)
    labels = torch.tensor([0, 1] * (batch["input_ids"].shape[0] // 2 + 1))[: batch["input_ids"].shape[0]]
    model.train_adapters("a", "b")
    out = model(**batch, labels=labels.repeat(2), adapters=Parallel("a", "b"))  # labels per output row
    out.loss.backward()
    for name in ("a", "b"):
        grads = [p.grad for m in model.adapter_modules(name) for p in m.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for m in model.adapter_modules("c") for p in m.parameters())


def test_unsupported_uses_are_refused() -> None:
    model = model_with()
    batch = tiny_batch(model.model)
    with pytest.raises(XlpeftValueError, match="at least two children"):
        Parallel("a")
    with pytest.raises(XlpeftValueError, match="per-example `adapters` list cannot hold Parallel"):
        run(model, batch, [Parallel("a", "b")] * batch["input_ids"].shape[0])
    with pytest.raises(XlpeftValueError, match="one Parallel block"):
        run(model, batch, Parallel("a", Stack("b", Parallel("a", "c"))))
    with pytest.raises(XlpeftValueError, match="BatchSplit children can be"):
        model.set_active(BatchSplit(Parallel("a", "b"), "c", batch_sizes=[1, 1]))
    with pytest.raises(XlpeftValueError, match="Fuse needs at least two|Fuse children can be"):
        model.set_active(Fuse(Parallel("a", "b"), "c"))
    with pytest.raises(XlpeftValueError, match="Average children can be"):
        model.set_active(Average(Parallel("a", "b"), "c"))
    with pytest.raises(XlpeftValueError, match="routing"):
        with model.routing(Parallel("a", "b")):
            pass
    seq2seq = model_with("t5", "seq2seq")
    seq2seq_batch = tiny_batch(seq2seq.model)
    with pytest.raises(XlpeftValueError, match="decoder_adapters"):
        run(seq2seq, seq2seq_batch, Parallel("a", "b"), decoder_adapters="a")
    seq2seq.set_active(Parallel("a", "b"))
    with pytest.raises(XlpeftValueError, match="generate"):
        seq2seq.generate(input_ids=seq2seq_batch["input_ids"], max_new_tokens=2)
