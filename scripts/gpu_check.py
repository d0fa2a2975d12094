"""GPU checks for a lent CUDA machine (never run by CI): bf16 adapters, exact merges, routing
without host syncs, compile graph reuse, all on a tiny random BERT on ``cuda``.

    PYTHONPATH=.:tests python scripts/gpu_check.py --out runs/gpu

Prints one JSON line per check and writes ``gpu_checks.json``; exits non-zero if a check failed.
The Lightning FSDP run is ``tests/test_fsdp.py::test_lightning_fsdp_run_writes_adapter_only_files``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from tiny import tiny_batch, tiny_model
from xlpeft import AdaptedModel, Stack
from xlpeft.methods import LoRAConfig

DEVICE = os.environ.get("XLPEFT_CHECK_DEVICE", "cuda")  # "cpu": a dry run of the script itself


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _model(dtype: torch.dtype) -> AdaptedModel:
    am = AdaptedModel(tiny_model("bert", "masked-lm").to(DEVICE, dtype))
    am.add_adapter("a", LoRAConfig(r=4, targets=("q", "v")))
    am.add_adapter("b", LoRAConfig(r=4, targets=("q", "v")))
    am.add_adapter("p", "pfeiffer")
    gen = torch.Generator().manual_seed(0)
    for name in am.adapter_names:
        am.load_adapter_state_dict(name, {k: v + 0.1 * torch.randn(v.shape, generator=gen).to(v)
                                          for k, v in am.adapter_state_dict(name).items()})
    return am


def _batch(am: AdaptedModel, n: int = 4) -> dict[str, torch.Tensor]:
    return {k: v.to(DEVICE) for k, v in tiny_batch(am.model, n).items()}


def check_bf16_precision() -> dict:
    am = _model(torch.bfloat16)
    dtypes = sorted({str(p.dtype) for m in am.adapter_modules("a") for p in m.parameters()})
    am.train_adapters("a")
    am.set_active("a")
    params = [p for p in am.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4)
    out = am(**_batch(am))[0]
    out.float().pow(2).mean().backward()
    opt.step()
    unchanged = sum(int((p.detach() == b).sum()) for p, b in zip(params, before))
    return {"check": "bf16 backbone: adapter dtype, AdamW step", "adapter_dtypes": dtypes,
            "output_dtype": str(out.dtype), "entries": sum(p.numel() for p in params),
            "unchanged_after_step": unchanged, "ok": dtypes == ["torch.float32"] and unchanged == 0
            and out.dtype == torch.bfloat16}


def check_merge_round_trip() -> dict:
    am = _model(torch.bfloat16)
    weights = {n: p.detach().clone() for n, p in am.model.named_parameters()}
    am.set_active(Stack("a", "b"))
    batch = _batch(am)
    unmerged = am(**batch)[0].float()
    am.merge("a")
    am.merge("b")
    merged = am(**batch)[0].float()
    am.unmerge("b")
    am.unmerge("a")
    drift = max(float((p.detach().float() - weights[n].float()).abs().max()) for n, p in am.model.named_parameters())
    return {"check": "bf16 merge/unmerge round trip (cuda)", "max_weight_drift": drift,
            "merged_vs_unmerged_max_abs": float((merged - unmerged).abs().max()), "ok": drift == 0.0}


def _first_sync(step) -> str | None:
    """Where ``step()`` first synchronises with the host (the innermost project/HF frame), or None."""
    import traceback

    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as err:
        frames = [f for f in traceback.extract_tb(err.__traceback__)
                  if "xlpeft" in f.filename or "transformers" in f.filename]
        where = f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
        return f"{str(err).splitlines()[0]} at {where}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def check_routing_syncs() -> dict:
    am = _model(torch.float32)
    am.train_adapters("a", "b")
    batch = _batch(am)
    plain = {k: v for k, v in batch.items() if k != "attention_mask"}
    routes = ["a", "b", "b", "a"]
    if DEVICE != "cuda":
        return {"check": "routed fwd+bwd with sync debug mode 'error'", "skipped": "no cuda", "ok": True}
    for b in (batch, plain):
        am(**b, adapters=routes)[0].sum().backward()  # warm-up: caches, lazy init
        am.set_active("a")
        am(**b)[0].sum().backward()
    _sync()
    found = {
        "bare backbone, with attention_mask": _first_sync(lambda: am.model(**batch)[0].sum().backward()),
        "active adapter, with attention_mask": _first_sync(lambda: am(**batch)[0].sum().backward()),
        "routed, with attention_mask": _first_sync(lambda: am(**batch, adapters=routes)[0].sum().backward()),
        "bare backbone, no mask": _first_sync(lambda: am.model(**plain)[0].sum().backward()),
        "routed, no mask": _first_sync(lambda: am(**plain, adapters=routes)[0].sum().backward()),
    }
    return {"check": "host syncs in fwd+bwd (sync debug mode 'error')", "first_sync": found,
            "ok": found["routed, no mask"] is None}


def check_compile_graphs() -> dict:
    import torch._dynamo as dynamo

    dynamo.reset()
    am = _model(torch.float32)
    batch = _batch(am)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(am, backend=backend)
    mixes = [["a", "b", "a", "b"], ["a", "a", "b", "b"], ["b", "a", "a", "a"], ["b", "b", "b", "a"],
             ["a", "b", "b", "b"], ["b", "a", "b", "a"]]
    worst = 0.0
    with torch.no_grad():
        for mix in mixes:
            got = compiled(**batch, adapters=mix)[0]
            want = am(**batch, adapters=mix)[0]
            worst = max(worst, float((got - want).abs().max()))
    return {"check": "torch.compile: graphs for 6 routing mixes", "graphs": len(graphs),
            "compiled_vs_eager_max_abs": worst, "ok": len(graphs) <= 2 and worst < 1e-4}


def check_routed_speed() -> dict:
    am = _model(torch.bfloat16)
    batch = _batch(am, 32)
    am.train_adapters("a", "b")

    def step(adapters) -> None:
        am(**batch, adapters=adapters)[0].float().sum().backward()

    def timed(adapters, reps: int = 30) -> float:
        for _ in range(3):
            step(adapters)
        _sync()
        start = time.perf_counter()
        for _ in range(reps):
            step(adapters)
        _sync()
        return (time.perf_counter() - start) / reps

    one = timed(["a"] * 32)
    mixed = timed(["a", "b"] * 16)
    return {"check": "tiny BERT bf16 fwd+bwd, routed 2 adapters / 1 (launch-bound model)",
            "one_ms": one * 1e3, "mixed_ms": mixed * 1e3, "ratio": mixed / one, "ok": True}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu")
    args = p.parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    results = []
    for check in (check_bf16_precision, check_merge_round_trip, check_routing_syncs, check_compile_graphs,
                  check_routed_speed):
        try:
            result = check()
        except Exception as err:  # report and go on: one script, every check
            result = {"check": check.__name__, "ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
        print(json.dumps(result), flush=True)
        results.append(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_checks.json").write_text(json.dumps({"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
                                                     "torch": torch.__version__, "results": results}, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
