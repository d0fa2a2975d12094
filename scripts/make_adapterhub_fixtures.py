"""Make the AdapterHub golden fixtures of ``tests/test_adapterhub_interop.py``.

Runs the real AdapterHub ``adapters`` library (1.x, which pins transformers
4.x) in its OWN virtual environment, never in xlpeft's::

    python3 -m venv /work/venv-adapters
    /work/venv-adapters/bin/pip install torch==2.13.0 adapters
    /work/venv-adapters/bin/python scripts/make_adapterhub_fixtures.py peer
    .venv/bin/python scripts/make_adapterhub_fixtures.py xlpeft      # xlpeft writes format="adapters"
    /work/venv-adapters/bin/python scripts/make_adapterhub_fixtures.py check   # the peer loads those

``peer``: tiny random BERT and XLM-R models (fixed seeds) get one adapter per
case, its weights randomised (non-identity), and the script saves the model
(config + safetensors), the adapter directory as ``adapters`` writes it, and
the peer's last hidden states for fixed inputs (``outputs.safetensors``); two
MAD-X ``Stack(lang, task)`` setups (SeqBn and default placement) likewise, and a
Compacter with AdapterHub's default shared PHM rule, which AdapterHub 1.x does
not save (its own reload differs), kept for xlpeft's refusal test.
``xlpeft``: xlpeft loads every case and writes it back with
``save_adapter(format="adapters")`` into a scratch folder. ``check``: the peer
loads xlpeft's directories and must reproduce its own outputs within 1e-5.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "adapterhub"
SCRATCH = Path(tempfile.gettempdir()) / "xlpeft-adapterhub-roundtrip"
FAMILIES = ("bert", "xlm-roberta")
TOL = 1e-5

# case → (adapters config class name, kwargs, weights file kind)
CASES = {
    "seqbn": ("SeqBnConfig", {"reduction_factor": 4}, "safetensors"),
    "seqbn_inv": ("SeqBnInvConfig", {"reduction_factor": 2}, "bin"),
    "double_seqbn": ("DoubleSeqBnConfig", {"reduction_factor": 8}, "bin"),
    "bn_post": ("BnConfig", {"mh_adapter": False, "output_adapter": True, "reduction_factor": 4,
                             "non_linearity": "gelu", "original_ln_before": False}, "safetensors"),
    "par_bn": ("ParBnConfig", {"reduction_factor": 4}, "bin"),
    "lora": ("LoRAConfig", {"r": 4, "alpha": 8, "attn_matrices": ["q", "k", "v"],
                            "intermediate_lora": True, "output_lora": True}, "safetensors"),
    "prefix": ("PrefixTuningConfig", {"prefix_length": 5, "bottleneck_size": 16}, "bin"),  # its safetensors save fails (shared tensors)
    "prefix_flat": ("PrefixTuningConfig", {"prefix_length": 4, "flat": True}, "bin"),
    "compacter": ("CompacterConfig", {"reduction_factor": 2, "shared_phm_rule": False}, "bin"),
}
UNLOADABLE = {  # written for the refusal tests: AdapterHub 1.x does not save a shared PHM rule
    "compacter_shared": ("CompacterConfig", {"reduction_factor": 2}, "bin"),
}
_BN = {"mh_adapter": False, "output_adapter": True, "original_ln_before": False}
STACKS = {  # MAD-X setups: a language adapter (with invertible) under a task adapter, Stack(lang, task) active
    "stack": {"stack_lang": ("SeqBnInvConfig", {"reduction_factor": 2}),
              "stack_task": ("SeqBnConfig", {"reduction_factor": 4})},
    "stack_bn": {"stack_bn_lang": ("BnConfig", {**_BN, "reduction_factor": 2, "non_linearity": "relu",
                                                "inv_adapter": "nice", "inv_adapter_reduction_factor": 2}),
                 "stack_bn_task": ("BnConfig", {**_BN, "reduction_factor": 4, "non_linearity": "relu"})},
}


def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(5, 120, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def tiny_config(family: str):
    from transformers import BertConfig, XLMRobertaConfig

    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "bert":
        return BertConfig(max_position_embeddings=64, pad_token_id=0, **common)
    return XLMRobertaConfig(max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                            **common)


def peer_model(family: str, seed: int):
    import adapters
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(family), attn_implementation="eager")
    adapters.init(model)
    return model.eval()


def randomise(model, name: str, seed: int) -> None:
    """Every adapter parameter random (zero-initialised up-projections would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if f".{name}." in pname or pname.endswith(f".{name}"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def peer() -> None:
    import adapters

    if ROOT.exists():
        shutil.rmtree(ROOT)
    batch = inputs()
    outputs = dict(batch)
    for f, family in enumerate(FAMILIES):
        base = peer_model(family, seed=100 + f)
        base.save_pretrained(ROOT / family / "model", safe_serialization=True)
        with torch.no_grad():
            outputs[f"{family}/base"] = base(**batch).last_hidden_state
        for c, (case, (cls, kwargs, kind)) in enumerate({**CASES, **UNLOADABLE}.items()):
            model = peer_model(family, seed=100 + f)
            name = f"{case}_a"
            model.add_adapter(name, config=getattr(adapters, cls)(**kwargs))
            randomise(model, name, seed=1000 * f + c)
            model.set_active_adapters(name)
            with torch.no_grad():
                outputs[f"{family}/{case}"] = model(**batch).last_hidden_state
            model.save_adapter(str(ROOT / family / case), name, use_safetensors=kind == "safetensors")
        for s, (setup, members) in enumerate(STACKS.items()):
            model = peer_model(family, seed=100 + f)
            for c, (case, (cls, kwargs)) in enumerate(members.items()):
                model.add_adapter(case, config=getattr(adapters, cls)(**kwargs))
                randomise(model, case, seed=5000 + 1000 * f + 100 * s + c)
                model.save_adapter(str(ROOT / family / case), case, use_safetensors=True)
            model.set_active_adapters(adapters.Stack(*members))
            with torch.no_grad():
                outputs[f"{family}/{setup}"] = model(**batch).last_hidden_state
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in outputs.items()}, str(ROOT / "outputs.safetensors"))
    (ROOT / "README.md").write_text(
        "Made by `scripts/make_adapterhub_fixtures.py peer` with AdapterHub adapters "
        f"{adapters.__version__} (transformers {__import__('transformers').__version__}, torch "
        f"{torch.__version__}); do not edit by hand.\n")
    print("wrote", ROOT, sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file()), "bytes")


def xlpeft_side() -> None:
    sys.path.insert(0, str(ROOT.parents[2]))
    from xlpeft import AdaptedModel

    if SCRATCH.exists():
        shutil.rmtree(SCRATCH)
    for family in FAMILIES:
        for case in CASES:
            model = AdaptedModel.from_pretrained(str(ROOT / family / "model"))
            name = model.load_adapter(str(ROOT / family / case))
            model.save_adapter(name, str(SCRATCH / family / case), format="adapters")
        model = AdaptedModel.from_pretrained(str(ROOT / family / "model"))
        for case in (c for members in STACKS.values() for c in members):
            model.save_adapter(model.load_adapter(str(ROOT / family / case)), str(SCRATCH / family / case),
                               format="adapters")
    print("xlpeft wrote", SCRATCH)


def check() -> None:
    from safetensors.torch import load_file

    outputs = load_file(str(ROOT / "outputs.safetensors"))
    batch = {k: outputs[k] for k in ("input_ids", "attention_mask")}
    worst = 0.0
    for f, family in enumerate(FAMILIES):
        for case in CASES:
            model = peer_model(family, seed=100 + f)
            name = model.load_adapter(str(SCRATCH / family / case), use_safetensors=True)
            model.set_active_adapters(name)
            with torch.no_grad():
                out = model(**batch).last_hidden_state
            err = (out - outputs[f"{family}/{case}"]).abs().max().item()
            worst = max(worst, err)
            status = "ok" if err <= TOL else "MISMATCH"
            print(f"{family:12s} {case:14s} max|Δ| {err:.2e} {status}")
            if err > TOL:
                raise SystemExit(f"the peer's output for xlpeft's {family}/{case} differs by {err}")
        import adapters
        for setup, members in STACKS.items():
            model = peer_model(family, seed=100 + f)
            for case in members:
                model.load_adapter(str(SCRATCH / family / case), use_safetensors=True)
            model.set_active_adapters(adapters.Stack(*members))
            with torch.no_grad():
                err = (model(**batch).last_hidden_state - outputs[f"{family}/{setup}"]).abs().max().item()
            worst = max(worst, err)
            print(f"{family:12s} {setup:14s} max|Δ| {err:.2e} {'ok' if err <= TOL else 'MISMATCH'}")
            if err > TOL:
                raise SystemExit(f"the peer's {setup} output for xlpeft's {family} adapters differs by {err}")
    config = json.loads((SCRATCH / FAMILIES[0] / "seqbn" / "adapter_config.json").read_text())
    print("peer loaded every xlpeft-written directory; worst max|Δ|", f"{worst:.2e};",
          "config keys", sorted(config))


if __name__ == "__main__":
    phase = sys.argv[1] if len(sys.argv) > 1 else ""
    {"peer": peer, "xlpeft": xlpeft_side, "check": check}.get(
        phase, lambda: sys.exit("usage: make_adapterhub_fixtures.py peer|xlpeft|check"))()
