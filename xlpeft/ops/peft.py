"""HF PEFT interop for LoRA adapters: read and write PEFT's directory layout.

PEFT (``peft.PeftModel.save_pretrained``) writes ``adapter_config.json`` with
``"peft_type": "LORA"`` and ``adapter_model.safetensors`` keyed
``base_model.model.<module path>.lora_A.weight`` (adapter name stripped), where
``<module path>`` is relative to the Hugging Face model PEFT wrapped. xlpeft's
LoRA computes the same ``y + (α/r)·B(A(dropout(x)))``, so only names change:

    xlpeft LinearPoint.linear ──(its path in model.model)──► PEFT key
    PEFT key ──► exact module name ──► LoRAConfig(target_patterns=[re.escape(name)])

PEFT features xlpeft lacks (DoRA, per-module ranks, trainable biases, extra
saved modules …) are refused by name rather than silently dropped.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from xlpeft.errors import IncompatibleAdapterError, XlpeftValueError
from xlpeft.ops.files import read_weights, write_directory
from xlpeft.methods.lora import LoRAConfig

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel

PREFIX = "base_model.model."
_WEIGHT_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight")

# PEFT fields whose non-default values change the computation in ways xlpeft
# LoRA cannot reproduce: (field, is-default test, what it means).
_UNSUPPORTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("use_dora", lambda v: not v, "DoRA (weight-decomposed LoRA)"),
    ("rank_pattern", lambda v: not v, "per-module ranks"),
    ("alpha_pattern", lambda v: not v, "per-module alphas"),
    ("modules_to_save", lambda v: not v, "extra fully trained modules"),
    ("bias", lambda v: v in (None, "none"), "trainable backbone biases"),
    ("lora_bias", lambda v: not v, "a bias on lora_B"),
    ("fan_in_fan_out", lambda v: not v, "transposed (Conv1D/GPT-2 style) weights"),
    ("trainable_token_indices", lambda v: not v, "trainable token embeddings"),
    ("layer_replication", lambda v: not v, "layer replication"),
    ("target_parameters", lambda v: not v, "LoRA on bare parameters"),
    ("use_qalora", lambda v: not v, "QA-LoRA"),
    ("alora_invocation_tokens", lambda v: v is None, "activated LoRA"),
    ("use_bdlora", lambda v: not v, "block-diagonal LoRA"),
    ("megatron_config", lambda v: not v, "Megatron parallel layers"),
)


# --------------------------------------------------------------------------- save


def _module_names(model: AdaptedModel) -> dict[int, str]:
    return {id(module): name for name, module in model.model.named_modules()}


def _lora_modules(model: AdaptedModel, name: str) -> dict[str, nn.Module]:
    """Module path in ``model.model`` → the adapter's LoRA module on it."""
    model._require(name)
    config = model.configs[name]
    if not isinstance(config, LoRAConfig) or config.gated:
        method = "gated lora" if isinstance(config, LoRAConfig) else config.method
        raise XlpeftValueError(
            f"the PEFT format can hold ungated 'lora' adapters; got {method!r} for adapter {name!r}. "
            "Save it with format='xlpeft'"
        )
    names = _module_names(model)
    return {names[id(point.linear)]: point.adapters[name]
            for point in model.points.values() if name in point.adapters}


def peft_config_dict(model: AdaptedModel, config: LoRAConfig, targets: list[str]) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT 0.x expects for these targets."""
    hf_config = getattr(model.model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(hf_config, "_name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
    }


def save_peft(model: AdaptedModel, name: str, path: str | os.PathLike) -> Path:
    """Write LoRA adapter ``name`` so ``peft.PeftModel.from_pretrained`` loads it."""
    modules = _lora_modules(model, name)
    tensors: dict[str, torch.Tensor] = {}
    for module_path, lora in modules.items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(lora, part).effective_weight()  # sparsity masks folded in
            tensors[f"{PREFIX}{module_path}.{part}.weight"] = weight.detach().contiguous().cpu()
    meta = peft_config_dict(model, model.configs[name], sorted(modules))

    return write_directory(path, meta, tensors)


# --------------------------------------------------------------------------- load


def check_supported(meta: dict[str, Any], path: Path) -> None:
    """Refuse PEFT configs whose features xlpeft's LoRA does not have."""
    peft_type = meta.get("peft_type")
    if peft_type != "LORA":
        raise XlpeftValueError(
            f"`peft_type` can be 'LORA' for xlpeft to load a PEFT adapter; got {peft_type!r} at {path}. "
            "Convert other PEFT methods by hand or use PEFT itself"
        )
    bad = [f"{key}={meta[key]!r} ({what})" for key, is_default, what in _UNSUPPORTED
           if key in meta and not is_default(meta[key])]
    if bad:
        raise XlpeftValueError(
            f"PEFT adapter at {path} uses features xlpeft LoRA does not support: {'; '.join(bad)}. "
            "Retrain without them, or merge the adapter with PEFT and load the merged backbone"
        )


def _split_keys(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {"lora_A": A, "lora_B": B}}`` from PEFT's flat keys."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _WEIGHT_KEY.fullmatch(key.removeprefix(PREFIX))
        if match is None:
            raise XlpeftValueError(
                f"PEFT adapter at {path} holds {key!r}; xlpeft can load keys '<module>.lora_A.weight' and "
                "'<module>.lora_B.weight' only (no DoRA magnitudes, embeddings or biases)"
            )
        out.setdefault(match["module"], {})[match["part"]] = value
    incomplete = sorted(m for m, parts in out.items() if len(parts) != 2)
    if incomplete or not out:
        raise IncompatibleAdapterError(
            f"PEFT adapter at {path} is incomplete: "
            + (f"lora_A/lora_B missing for {incomplete[:3]}" if incomplete else "it holds no LoRA weights")
        )
    return out


def _resolve(model: nn.Module, module_path: str) -> str | None:
    """``module_path`` in ``model``, allowing PEFT to have wrapped the bare base model or a head."""
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [module_path, f"{prefix}.{module_path}" if prefix else module_path]
    if prefix and module_path.startswith(prefix + "."):
        candidates.append(module_path[len(prefix) + 1:])
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


def _targets(model: AdaptedModel, weights: dict[str, dict[str, torch.Tensor]], path: Path,
             r: int) -> dict[str, dict[str, torch.Tensor]]:
    """Check every PEFT target is a matching ``nn.Linear``; key by name in ``model.model``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    problems: list[str] = []
    for module_path, parts in weights.items():
        found = _resolve(model.model, module_path)
        module = model.model.get_submodule(found) if found is not None else None
        a, b = parts["lora_A"], parts["lora_B"]
        if module is None:
            problems.append(f"{module_path}: no such module")
        elif not isinstance(module, nn.Linear):
            problems.append(f"{module_path}: a {type(module).__name__}, xlpeft LoRA adapts nn.Linear only")
        elif (tuple(a.shape), tuple(b.shape)) != ((r, module.in_features), (module.out_features, r)):
            problems.append(f"{module_path}: lora_A {tuple(a.shape)}/lora_B {tuple(b.shape)} vs "
                            f"expected {(r, module.in_features)}/{(module.out_features, r)}")
        else:
            out[found] = parts
    if problems:
        raise IncompatibleAdapterError(
            f"PEFT adapter at {path} does not fit this {type(model.model).__name__} "
            f"({'; '.join(problems[:5])}{' …' if len(problems) > 5 else ''}); "
            "load it into the backbone it was trained with"
        )
    return out


def lora_config_from_peft(meta: dict[str, Any], module_names: list[str]) -> LoRAConfig:
    """The xlpeft ``LoRAConfig`` equal to a PEFT LoRA config on these exact modules."""
    r = int(meta.get("r", 8))
    alpha = float(meta.get("lora_alpha", 8))
    if meta.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by α/√r = (α√r)/r
    return LoRAConfig(r=r, alpha=alpha, dropout=float(meta.get("lora_dropout") or 0.0),
                      target_patterns=tuple(re.escape(n) for n in module_names))


def _default_name(path: Path) -> str:
    return re.sub(r"[.+/ ]", "_", path.name) or "default"


def load_peft(model: AdaptedModel, path: str | os.PathLike, meta: dict[str, Any],
              name: str | None) -> str:
    """Load a PEFT LoRA directory into ``model``; on any error the model is unchanged."""
    path = Path(path)
    check_supported(meta, path)
    r = int(meta.get("r", 8))
    weights = _targets(model, _split_keys(read_weights(path), path), path, r)
    config = lora_config_from_peft(meta, list(weights))
    name = name or _default_name(path)
    model.add_adapter(name, config)
    try:
        names = _module_names(model)
        tensors = {}
        for key, point in model.points.items():
            if name in point.adapters:
                parts = weights[names[id(point.linear)]]
                for part, value in parts.items():
                    tensors[f"{key.replace('-', '.')}.{part}.weight"] = value
        model.load_adapter_state_dict(name, tensors)
    except Exception:
        model.delete_adapter(name)
        raise
    return name
