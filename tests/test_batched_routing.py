"""Batched routed computation (``core.batched``) equals the per-group loop and each group alone.

Forward outputs and gradients, non-identity weights, mixed group sizes and
mixed adapter sizes (bottleneck widths, LoRA ranks and scales, prefix lengths),
Stacks of different depths, float32 and a bfloat16 backbone with float32
adapters, and one compiled graph for several mixes. The loop is what
``router.batched = False`` runs; a spy on ``Route.dispatch`` shows which path ran.
"""

from __future__ import annotations

import pytest
import torch
from tiny import main_output as main, perturb, tiny_batch, tiny_model

from xlpeft import AdaptedModel, Average, Fuse, Stack
from xlpeft.core import batched
from xlpeft.core.routing import Route
from xlpeft.methods import BottleneckConfig, DoRAConfig, IA3Config, LoRAConfig, PrefixConfig

KINDS = {
    "bottleneck": [BottleneckConfig(reduction_factor=4, placement=("attn", "ffn")),
                   BottleneckConfig(reduction_factor=2, placement=("attn", "ffn"), scaling=0.5),
                   BottleneckConfig(reduction_factor=8, placement=("ffn",))],
    "parallel": [BottleneckConfig(reduction_factor=4, mode="parallel", scaling=4.0),
                 BottleneckConfig(reduction_factor=2, mode="parallel", scaling=4.0),
                 BottleneckConfig(reduction_factor=4, mode="parallel", scaling=2.0)],
    "lora": [LoRAConfig(r=2, targets=("q", "v")), LoRAConfig(r=4, alpha=4, targets=("q", "v")),
             LoRAConfig(r=2, targets=("v", "ffn_up"))],
    "ia3": [IA3Config(), IA3Config(), IA3Config(targets=("v", "ffn_down"))],
    "prefix": [PrefixConfig(prefix_length=3, reparametrize=False), PrefixConfig(prefix_length=5),
               PrefixConfig(prefix_length=2, reparametrize=False)],
}
MIX = ["a", "b", "a", "c", "c", "b", "a"]  # groups of 3, 2, 2, interleaved


def adapted(configs: list, dtype: torch.dtype = torch.float32, names: str = "abcd") -> AdaptedModel:
    am = AdaptedModel(tiny_model("bert", "masked-lm").to(dtype))
    for i, (name, config) in enumerate(zip(names, configs + configs[:1])):
        am.add_adapter(name, config)
        perturb(am, name, seed=i)
    am.train_adapters(*names[:len(configs) + 1])
    return am.eval()  # no dropout: the paths draw no random masks


def outputs_and_grads(am: AdaptedModel, batch: dict, mix: list, flag: bool) -> tuple[torch.Tensor, dict]:
    am.state.batched = flag
    am.zero_grad(set_to_none=True)
    out = main(am(**batch, adapters=mix))
    out.float().pow(2).mean().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in am.named_parameters() if p.requires_grad}
    return out.detach(), grads


class Spy:
    """Counts ``Route.dispatch`` calls (the per-group loop) on grouped routes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loops = 0
        original = Route.dispatch

        def dispatch(route: Route, fn, *tensors):
            self.loops += route.grouped
            return original(route, fn, *tensors)
        monkeypatch.setattr(Route, "dispatch", dispatch)


def assert_grads_close(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], want[name], **tol, msg=name)


@pytest.mark.parametrize("kind", list(KINDS))
def test_batched_equals_loop_and_each_group_alone(kind: str, monkeypatch) -> None:
    am = adapted(KINDS[kind])
    batch = tiny_batch(am.model, batch=len(MIX))
    spy = Spy(monkeypatch)
    out, grads = outputs_and_grads(am, batch, MIX, True)
    assert spy.loops == 0  # every point took the batched path
    ref, ref_grads = outputs_and_grads(am, batch, MIX, False)
    assert spy.loops > 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    assert all(g is None for n, g in grads.items() if ".d." in f".{n}.")  # d is in no row
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    for name in "abc":
        rows = [i for i, s in enumerate(MIX) if s == name]
        with torch.no_grad():
            alone = main(am(**{k: v[rows] for k, v in batch.items()}, adapters=name))
        torch.testing.assert_close(out[rows], alone, rtol=1e-5, atol=1e-5)


def test_stacks_of_different_depths_batch_per_depth(monkeypatch) -> None:
    """MAD-X style: language adapters under one task adapter, plus a bare task and a bare language."""
    bn = BottleneckConfig(reduction_factor=4)
    am = adapted([bn, BottleneckConfig(reduction_factor=2), BottleneckConfig(reduction_factor=4, scaling=2.0)])
    mix = [Stack("a", "c"), Stack("b", "c"), "c", Stack("a", "c"), "b", Stack("b", "a")]
    batch = tiny_batch(am.model, batch=len(mix))
    spy = Spy(monkeypatch)
    out, grads = outputs_and_grads(am, batch, mix, True)
    assert spy.loops == 0
    ref, ref_grads = outputs_and_grads(am, batch, mix, False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("residual", [True, False, "post_add"])
def test_post_norm_seqbn_stacks_batch(residual, monkeypatch) -> None:
    """SeqBn (MAD-X paper) placement: language adapters under a task adapter, and a setup without any."""
    seqbn = dict(placement=("ffn",), original_ln_before=True, residual_before_ln=residual)
    am = adapted([BottleneckConfig(reduction_factor=4, **seqbn), BottleneckConfig(reduction_factor=2, **seqbn),
                  BottleneckConfig(reduction_factor=4, scaling=2.0, **seqbn)])
    am.add_adapter("e", LoRAConfig(r=2, targets=("q",)))  # acts nowhere near the norm
    perturb(am, "e", seed=9)
    mix = [Stack("a", "c"), Stack("b", "c"), "c", "e", Stack("a", "c"), "b"]
    batch = tiny_batch(am.model, batch=len(mix))
    spy = Spy(monkeypatch)
    out, grads = outputs_and_grads(am, batch, mix, True)
    assert spy.loops == 0
    ref, ref_grads = outputs_and_grads(am, batch, mix, False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


def test_bf16_backbone_with_fp32_adapters(monkeypatch) -> None:
    am = adapted([LoRAConfig(r=2, targets=("q", "v")), LoRAConfig(r=4, targets=("q", "v")),
                  LoRAConfig(r=2, targets=("q", "v"))], dtype=torch.bfloat16)
    am2 = adapted(KINDS["bottleneck"], dtype=torch.bfloat16)
    for model in (am, am2):
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        batch = tiny_batch(model.model, batch=len(MIX))
        spy = Spy(monkeypatch)
        out, grads = outputs_and_grads(model, batch, MIX, True)
        assert spy.loops == 0 and out.dtype == torch.bfloat16
        ref, ref_grads = outputs_and_grads(model, batch, MIX, False)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
        assert all(g is None or g.dtype == torch.float32 for g in grads.values())
        assert_grads_close(grads, ref_grads, rtol=5e-2, atol=1e-3)


@pytest.mark.parametrize("mix", [
    ["a", Average("a", "b"), "a"],          # Average has its own algebra
    [Fuse("a", "b"), "b", "a"],             # so has Fuse
], ids=["average", "fuse"])
def test_blocks_with_their_own_algebra_take_the_loop(mix: list, monkeypatch) -> None:
    am = adapted(KINDS["bottleneck"][:2])
    batch = tiny_batch(am.model, batch=len(mix))
    spy = Spy(monkeypatch)
    out, _ = outputs_and_grads(am, batch, mix, True)
    assert spy.loops > 0
    ref, _ = outputs_and_grads(am, batch, mix, False)
    torch.testing.assert_close(out, ref)


def test_plan_names_what_cannot_batch() -> None:
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    am.add_adapter("lora", LoRAConfig(r=2, targets=("q",)))
    am.add_adapter("lora2", LoRAConfig(r=2, targets=("q",), dropout=0.1))
    am.add_adapter("ia3", IA3Config(targets=("q",), input_scaled=()))
    am.add_adapter("dora", DoRAConfig(r=2, targets=("q",)))
    am.add_adapter("gated", LoRAConfig(r=2, targets=("q",), gated=True))
    point = next(p for p in am.points.values() if "lora" in p.adapters)
    kernels = batched.LINEAR_OUTPUT

    def plan(*setups):
        return batched.plan(setups, point._leaf, lambda m: True, kernels)
    assert plan("lora", "ia3") is None                      # two kinds at one depth
    assert plan("lora", "lora2") is None                    # different dropout rates
    assert plan("lora", "gated") is None and plan("dora", "lora") is None  # no kernel
    assert len(plan(Stack("dora", "lora"), "dora")) == 2    # one module for all groups: called directly
    assert plan("lora", Stack("lora", "ia3"), "nowhere") is not None


def test_one_compiled_graph_for_several_mixes_with_eager_gradients() -> None:
    class Counter:
        graphs = 0

        def __call__(self, gm, example_inputs):
            Counter.graphs += 1
            return gm.forward
    am = adapted([LoRAConfig(r=2, targets=("q", "v")), LoRAConfig(r=4, targets=("q", "v")),
                  BottleneckConfig(reduction_factor=4)])
    batch = tiny_batch(am.model, batch=4)
    mixes = [["a", "b", "c", "a"], ["c", "c", "a", "b"], ["b", "a", "c", "c"]]
    torch._dynamo.reset()
    compiled = torch.compile(am.model, backend=Counter(), dynamic=False)
    params = [p for p in am.parameters() if p.requires_grad]
    try:
        for mix in mixes:
            runs = []
            for model, flag in ((compiled, True), (am.model, False)):
                am.state.batched = flag
                am.zero_grad(set_to_none=True)
                with am.routing(mix):
                    out = main(model(**batch))
                out.pow(2).mean().backward()
                runs.append((out.detach(), [p.grad for p in params]))
            torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5)
            for got, want in zip(runs[0][1], runs[1][1]):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    finally:
        torch._dynamo.reset()
    assert Counter.graphs == 1


def test_a_replaced_adapter_gets_a_new_plan() -> None:
    """Plans are kept per setups; deleting and re-adding a name (another kind) must not reuse one."""
    am = adapted(KINDS["lora"][:2])
    batch = tiny_batch(am.model, batch=len(MIX[:4]))
    mix = MIX[:4]
    outputs_and_grads(am, batch, mix, True)
    am.delete_adapter("b")
    am.add_adapter("b", IA3Config(targets=("q", "v"), input_scaled=()))
    perturb(am, "b", seed=5)
    am.train_adapters("a", "b")
    out, _ = outputs_and_grads(am, batch, mix, True)
    ref, _ = outputs_and_grads(am, batch, mix, False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fsdp1_wrapped_model_batches_with_its_weights_gathered(group, monkeypatch) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    am = adapted(KINDS["lora"][:2])
    batch = tiny_batch(am.model, batch=len(MIX[:4]))
    with torch.no_grad():
        want = main(am(**batch, adapters=MIX[:4]))
    wrapped = FSDP(am, device_id=torch.device("cpu"), use_orig_params=True)
    spy = Spy(monkeypatch)
    with torch.no_grad():
        got = main(wrapped(**batch, adapters=MIX[:4]))
    assert spy.loops == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
