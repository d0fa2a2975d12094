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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from xlpeft.errors import CorruptFileError, IncompatibleAdapterError, XlpeftValueError, XlpeftWarning, close_matches
from xlpeft.methods.base import short
from xlpeft.methods.lora import LoRAConfig
from xlpeft.ops.files import WEIGHTS_NAME, write_directory
from xlpeft.ops.weights import open_weights

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
    model.require_adapters(name)
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

# Every key PEFT's LoraConfig (0.x up to 0.21) writes; others are named in a warning.
KNOWN_KEYS = frozenset((
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path",
    "bias", "corda_config", "enable_lora", "ensure_weight_tying", "eva_config", "exclude_modules",
    "fan_in_fan_out", "inference_mode", "init_lora_weights", "kasa_config", "layer_replication",
    "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout",
    "lora_ga_config", "megatron_config", "megatron_core", "modules_to_save", "monteclora_config",
    "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config",
    "target_modules", "target_parameters", "task_type", "trainable_token_indices", "use_bdlora", "use_dora",
    "use_qalora", "use_rslora", "velora_config",
))
REQUIRED_KEYS = ("peft_type", "r", "lora_alpha")


def check_supported(meta: dict[str, Any], path: Path) -> None:
    """Refuse PEFT configs whose features xlpeft's LoRA does not have, or whose values are malformed."""
    peft_type = meta.get("peft_type")
    if peft_type != "LORA":
        raise XlpeftValueError(
            f"`peft_type` can be 'LORA' for xlpeft to load a PEFT adapter; got {short(peft_type)} at {path}. "
            "Convert other PEFT methods by hand or use PEFT itself"
        )
    absent = [k for k in REQUIRED_KEYS if k not in meta]
    if absent:
        raise CorruptFileError(f"PEFT config at {path} lacks {absent}; without them the adapter's scale is "
                               "unknown (PEFT writes both r and lora_alpha): save it again with PEFT")
    unknown_keys = sorted(str(k) for k in meta if k not in KNOWN_KEYS)
    if unknown_keys:
        hints = {k: close_matches(k, KNOWN_KEYS, n=1) for k in unknown_keys[:5]}
        shown = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        warnings.warn(f"PEFT config at {path} has keys xlpeft does not know and ignores: {shown}. A newer "
                      "PEFT may have added them; check the loaded adapter", XlpeftWarning, stacklevel=3)
    bad = []
    for key, is_default, what in _UNSUPPORTED:
        if key in meta:
            try:
                default = bool(is_default(meta[key]))
            except Exception:  # an odd value (e.g. a list where a string goes) is not a default either
                default = False
            if not default:
                bad.append(f"{key}={short(meta[key])} ({what})")
    if bad:
        raise XlpeftValueError(
            f"PEFT adapter at {path} uses features xlpeft LoRA does not support: {'; '.join(bad)}. "
            "Retrain without them, or merge the adapter with PEFT and load the merged backbone"
        )


def _value(meta: dict[str, Any], key: str, ok: Callable[[Any], bool], what: str, path: Path) -> Any:
    value = meta.get(key)
    if not ok(value):
        raise CorruptFileError(f"PEFT config at {path}: `{key}` can be {what}; got {short(value)}")
    return value


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def lora_config_from_peft(meta: dict[str, Any], module_names: list[str], path: Path = Path(".")) -> LoRAConfig:
    """The xlpeft ``LoRAConfig`` equal to a PEFT LoRA config on these exact modules."""
    r = _value(meta, "r", lambda v: type(v) is int and v >= 1, "an integer ≥ 1", path)
    alpha = float(_value(meta, "lora_alpha", lambda v: _real(v) and v > 0, "a number > 0", path))
    dropout = _value(meta, "lora_dropout", lambda v: v is None or (_real(v) and 0 <= v < 1),
                     "a number in [0, 1) or null", path)
    rslora = _value(meta, "use_rslora", lambda v: v is None or isinstance(v, bool), "true or false", path)
    if rslora:
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by α/√r = (α√r)/r
    return LoRAConfig(r=r, alpha=alpha, dropout=float(dropout or 0.0),
                      target_patterns=tuple(re.escape(n) for n in module_names))


def _split_keys(shapes: dict[str, tuple[int, ...]], path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{module path: {"lora_A": shape, "lora_B": shape}}`` from PEFT's flat keys."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        match = _WEIGHT_KEY.fullmatch(key.removeprefix(PREFIX))
        if match is None or len(shape) != 2:
            raise XlpeftValueError(
                f"PEFT adapter at {path} holds {short(key, 240)} {shape}; xlpeft can load 2-d keys "
                "'<module>.lora_A.weight' and '<module>.lora_B.weight' only (no DoRA magnitudes, embeddings or biases)"
            )
        out.setdefault(match["module"], {})[match["part"]] = shape
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


def _targets(model: AdaptedModel, shapes: dict[str, dict[str, tuple[int, ...]]], path: Path,
             r: int) -> dict[str, str]:
    """Check every PEFT target is a matching ``nn.Linear``; its name in ``model.model`` → its PEFT path."""
    out: dict[str, str] = {}
    problems: list[str] = []
    for module_path, parts in shapes.items():
        found = _resolve(model.model, module_path)
        module = model.model.get_submodule(found) if found is not None else None
        a, b = parts["lora_A"], parts["lora_B"]
        if module is None:
            problems.append(f"{module_path}: no such module")
        elif not isinstance(module, nn.Linear):
            problems.append(f"{module_path}: a {type(module).__name__}, xlpeft LoRA adapts nn.Linear only")
        elif (a, b) != ((r, module.in_features), (module.out_features, r)):
            problems.append(f"{module_path}: lora_A {a}/lora_B {b} vs "
                            f"expected {(r, module.in_features)}/{(module.out_features, r)}")
        else:
            out[found] = module_path
    if problems:
        raise IncompatibleAdapterError(
            f"PEFT adapter at {path} does not fit this {type(model.model).__name__} "
            f"({'; '.join(problems[:5])}{' …' if len(problems) > 5 else ''}); "
            "load it into the backbone it was trained with"
        )
    return out


def _default_name(path: Path) -> str:
    name = "".join(c if c.isprintable() and c not in ".+/\\ " else "_" for c in path.name)[:128]
    return name or "default"


def load_peft(model: AdaptedModel, path: str | os.PathLike, meta: dict[str, Any],
              name: str | None, verify: bool = True) -> str:
    """Load a PEFT LoRA directory into ``model``; on any error the model is unchanged."""
    path = Path(path)
    check_supported(meta, path)
    weights = open_weights(path, WEIGHTS_NAME)
    probe = lora_config_from_peft(meta, [], path)
    targets = _targets(model, _split_keys(weights.shapes(), path), path, probe.r)
    config = lora_config_from_peft(meta, list(targets), path)
    name = name or _default_name(path)
    model.add_adapter(name, config)
    try:
        tensors = weights.load(verify, legacy_warning=False)  # files PEFT wrote carry no xlpeft checksum
        names = _module_names(model)
        state = {}
        for place, point in model.adapter_places(name).items():  # keys: the adapter's own places
            peft_path = targets[names[id(point.linear)]]
            for part in ("lora_A", "lora_B"):
                state[f"{place}.{part}.weight"] = tensors[f"{PREFIX}{peft_path}.{part}.weight"] \
                    if f"{PREFIX}{peft_path}.{part}.weight" in tensors else tensors[f"{peft_path}.{part}.weight"]
        model.load_adapter_state_dict(name, state)
    except BaseException:
        model.delete_adapter(name)
        raise
    return name
