"""AdapterHub ``adapters`` interop: read and write its adapter directories.

AdapterHub (``adapters`` 1.x, ``model.save_adapter``) writes
``adapter_config.json`` (``{"config": {...}, "model_type", "hidden_size",
"name", ...}``) and ``adapter.safetensors`` or ``pytorch_adapter.bin`` (read
here with ``torch.load(weights_only=True)``), keyed by module paths of the
bare BERT-like model (a head model's ``bert.``/``roberta.`` prefix is dropped):

    encoder.layer.3.output.adapters.<n>.adapter_down.0.weight   ─► encoder.3.ffn[_ln].down.weight
    encoder.layer.3.attention.output.adapters.<n>.adapter_up.bias ─► encoder.3.attn.up.bias
    invertible_adapters.<n>.F.0.weight                          ─► shared.invertible.F.0.weight
    encoder.layer.3.attention.self.query.loras.<n>.lora_A       ─► encoder.3.attention.self.query.lora_A.weight

Bottleneck configs map field by field (``SeqBnConfig``: ``original_ln_before``;
``DoubleSeqBnConfig``: attention + FFN; ``ParBnConfig``: parallel; ``inv_adapter
"nice"``: a union with an invertible adapter); LoRA maps ``attn_matrices`` and
``intermediate_lora``/``output_lora`` to roles. Features xlpeft lacks (adapter
LayerNorms, gating, learned scaling, PHM/Compacter, GLOW couplings, prefix
tuning, DoRA/VeRA, (IA)3 mode, ReFT) are refused by name, never dropped.
BERT/mBERT and XLM-R only.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from xlpeft.errors import CorruptFileError, IncompatibleAdapterError, XlpeftValueError, XlpeftWarning
from xlpeft.methods.base import AdapterConfig, ConfigUnion, short
from xlpeft.methods.bottleneck import BottleneckConfig
from xlpeft.methods.invertible import InvertibleConfig
from xlpeft.methods.lora import LoRAConfig
from xlpeft.ops.artefacts import ArtefactKind
from xlpeft.ops.files import CONFIG_NAME, write_directory
from xlpeft.ops.weights import open_weights

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel

SAFE_WEIGHTS = "adapter.safetensors"
BIN_WEIGHTS = "pytorch_adapter.bin"
FAMILIES = ("bert", "xlm-roberta")
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "swish", "tanh": "tanh"}


def is_adapterhub(meta: Any) -> bool:
    """An AdapterHub ``adapter_config.json``: a config plus the model fields, no xlpeft backbone record."""
    return isinstance(meta, dict) and "config" in meta and "model_type" in meta and "backbone" not in meta


HUB_ADAPTER = ArtefactKind("AdapterHub adapter", CONFIG_NAME, (CONFIG_NAME, SAFE_WEIGHTS), is_adapterhub)

# (field, is-default test, what it is) for bottleneck fields xlpeft cannot reproduce
_BN_UNSUPPORTED = (
    ("ln_before", lambda v: not v, "an adapter LayerNorm before it"),
    ("ln_after", lambda v: not v, "an adapter LayerNorm after it"),
    ("adapter_residual_before_ln", lambda v: not v, "the adapter residual before its own LayerNorm"),
    ("original_ln_after", lambda v: v is None or v is True, "no block LayerNorm after the adapter"),
    ("use_gating", lambda v: not v, "gating"),
    ("phm_layer", lambda v: not v, "PHM layers (Compacter)"),
    ("cross_adapter", lambda v: not v, "cross-attention adapters"),
    ("stochastic_depth", lambda v: not v, "stochastic depth"),
    ("scaling", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "learned scaling"),
    ("inv_adapter", lambda v: v in (None, "nice"), "a GLOW coupling"),
)
_LORA_UNSUPPORTED = (
    ("composition_mode", lambda v: v in (None, "add"), "(IA)3 (composition_mode 'scale')"),
    ("use_gating", lambda v: not v, "gating"),
    ("use_dora", lambda v: not v, "DoRA"),
    ("vera_d", lambda v: v is None, "VeRA"),
    ("vera_b", lambda v: v is None, "VeRA"),
)


# --------------------------------------------------------------------------- configs


def _refuse(config: dict[str, Any], table: tuple, path: Path) -> None:
    bad = [f"{k}={short(config[k])} ({what})" for k, ok, what in table if k in config and not ok(config[k])]
    if bad:
        raise XlpeftValueError(f"AdapterHub adapter at {path} uses features xlpeft does not support: "
                               f"{'; '.join(bad)}. Retrain it without them, or use AdapterHub itself")


def _number(config: dict[str, Any], key: str, path: Path) -> float:
    value = config.get(key)
    if isinstance(value, dict) and set(value) <= {"default"} and "default" in value:
        value = value["default"]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise XlpeftValueError(f"AdapterHub config at {path}: `{key}` can be a number > 0 (one for all "
                               f"layers); got {short(value)}. Per-layer values are not supported")
    return float(value)


def _leave_out(config: dict[str, Any], path: Path) -> tuple[int, ...]:
    value = config.get("leave_out") or []
    if not isinstance(value, list) or not all(type(i) is int for i in value):
        raise CorruptFileError(f"AdapterHub config at {path}: `leave_out` can be a list of layer indices; "
                               f"got {short(value)}")
    return tuple(value)


def _activation(config: dict[str, Any], path: Path) -> str:
    name = str(config.get("non_linearity", "relu")).lower()
    if name not in ACTIVATIONS:
        raise XlpeftValueError(f"AdapterHub config at {path}: `non_linearity` can be "
                               f"{', '.join(ACTIVATIONS)} for xlpeft; got {short(name)}")
    return ACTIVATIONS[name]


def bottleneck_from_hub(config: dict[str, Any], path: Path) -> AdapterConfig:
    """The xlpeft config computing what an AdapterHub ``BnConfig`` computes."""
    _refuse(config, _BN_UNSUPPORTED, path)
    placement = tuple(p for p, key in (("attn", "mh_adapter"), ("ffn", "output_adapter")) if config.get(key))
    if not placement:
        raise XlpeftValueError(f"AdapterHub config at {path} has neither mh_adapter nor output_adapter; "
                               "it places no adapter")
    parallel = bool(config.get("is_parallel"))
    residual = config.get("residual_before_ln", True)
    if config.get("dropout"):
        warnings.warn(f"AdapterHub adapter at {path} has dropout {config['dropout']}; xlpeft bottlenecks "
                      "have none (outputs are equal in eval mode; training differs)", XlpeftWarning, stacklevel=4)
    bottleneck = BottleneckConfig(
        reduction_factor=_number(config, "reduction_factor", path), non_linearity=_activation(config, path),
        placement=placement, mode="parallel" if parallel else "sequential",
        scaling=float(config.get("scaling", 1.0)), init_zero_up=False, leave_out=_leave_out(config, path),
        original_ln_before=bool(config.get("original_ln_before")) and not parallel,
        residual_before_ln=residual if residual in (True, False, "post_add") else True,
    )
    if config.get("inv_adapter") != "nice":
        return bottleneck
    inverse = InvertibleConfig(reduction_factor=_number(config, "inv_adapter_reduction_factor", path),
                               non_linearity=_activation(config, path), init_zero=False)
    return ConfigUnion((bottleneck, inverse))


_ROLE_OF = {"q": "q", "k": "k", "v": "v"}


def lora_from_hub(config: dict[str, Any], path: Path) -> LoRAConfig:
    _refuse(config, _LORA_UNSUPPORTED, path)
    matrices = config.get("attn_matrices", ["q", "v"]) if config.get("selfattn_lora", True) else []
    if not isinstance(matrices, list) or any(m not in _ROLE_OF for m in matrices):
        raise XlpeftValueError(f"AdapterHub LoRA at {path}: `attn_matrices` can list q, k, v; got {short(matrices)}")
    targets = [_ROLE_OF[m] for m in matrices]
    targets += ["ffn_up"] * bool(config.get("intermediate_lora")) + ["ffn_down"] * bool(config.get("output_lora"))
    r = config.get("r", 8)
    if type(r) is not int or r < 1:
        raise CorruptFileError(f"AdapterHub LoRA at {path}: `r` can be an integer ≥ 1; got {short(r)}")
    return LoRAConfig(r=r, alpha=_number({"alpha": config.get("alpha", 8)}, "alpha", path), targets=tuple(targets),
                      dropout=float(config.get("dropout") or 0.0), leave_out=_leave_out(config, path),
                      init_zero_b=False)


def config_from_hub(config: Any, path: Path) -> AdapterConfig:
    if not isinstance(config, dict):
        raise CorruptFileError(f"AdapterHub config at {path}: `config` can be an object; got {short(config)} "
                               "(a config name only: load it into AdapterHub, save it again)")
    architecture = config.get("architecture") or "bottleneck"
    if architecture == "bottleneck":
        return bottleneck_from_hub(config, path)
    if architecture == "lora":
        return lora_from_hub(config, path)
    raise XlpeftValueError(f"AdapterHub `architecture` can be 'bottleneck' or 'lora' for xlpeft; got "
                           f"{short(architecture)} at {path}. Prefix tuning, prompt tuning, ReFT and unions "
                           "are not converted")


# --------------------------------------------------------------------------- keys

_BN_KEY = re.compile(r"encoder\.layer\.(\d+)\.(attention\.output|output)\.adapters\.([^.]+)\."
                     r"adapter_(down\.0|up)\.(weight|bias)")
_INV_KEY = re.compile(r"invertible_adapters\.([^.]+)\.([FG]\.[02]\.(?:weight|bias))")
_LORA_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.loras\.([^.]+)\.lora_([AB])")


def xlpeft_key(key: str, post_norm: bool) -> tuple[str, str] | None:
    """(xlpeft state key, AdapterHub adapter name) of an AdapterHub key; None if it is no known key."""
    if m := _BN_KEY.fullmatch(key):
        sublayer = ("attn" if m[2] == "attention.output" else "ffn") + ("_ln" if post_norm else "")
        return f"encoder.{m[1]}.{sublayer}.{m[4].removesuffix('.0')}.{m[5]}", m[3]
    if m := _INV_KEY.fullmatch(key):
        return f"shared.invertible.{m[2]}", m[1]
    if m := _LORA_KEY.fullmatch(key):
        return f"encoder.{m[1]}.{m[2]}.lora_{m[4]}.weight", m[3]
    return None


def hub_key(key: str, name: str) -> str:
    """The AdapterHub key of an xlpeft state key (the inverse of ``xlpeft_key``)."""
    if key.startswith("shared.invertible."):
        return f"invertible_adapters.{name}.{key.removeprefix('shared.invertible.')}"
    m = re.fullmatch(r"encoder\.(\d+)\.(attn|ffn)(?:_ln)?\.(down|up)\.(weight|bias)", key)
    if m:
        module = "attention.output" if m[2] == "attn" else "output"
        part = "down.0" if m[3] == "down" else "up"
        return f"encoder.layer.{m[1]}.{module}.adapters.{name}.adapter_{part}.{m[4]}"
    m = re.fullmatch(r"encoder\.(\d+)\.(.+)\.lora_([AB])\.weight", key)
    if m:
        return f"encoder.layer.{m[1]}.{m[2]}.loras.{name}.lora_{m[3]}"
    raise XlpeftValueError(f"xlpeft key {key!r} has no AdapterHub name; save this adapter with format='xlpeft'")


# --------------------------------------------------------------------------- load


def _check_backbone(model: AdaptedModel, meta: dict[str, Any], path: Path) -> None:
    if model.layout.family not in FAMILIES:
        raise IncompatibleAdapterError(f"AdapterHub adapters can be loaded into {', '.join(FAMILIES)} models "
                                       f"with xlpeft; this model is {model.layout.family!r}")
    here = {"model_type": getattr(model.model.config, "model_type", ""), "hidden_size": model.backbone.hidden}
    diffs = [f"{k}: file {short(meta.get(k))} vs model {v!r}" for k, v in here.items() if meta.get(k) != v]
    if diffs:
        raise IncompatibleAdapterError(f"AdapterHub adapter at {path} was trained for another backbone "
                                       f"({'; '.join(diffs)}); load it into the backbone it was trained with")


def _bin_tensors(file: Path) -> dict[str, torch.Tensor]:
    """``pytorch_adapter.bin`` with ``weights_only=True`` (memory-mapped: nothing allocated before the checks)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # weights_only refuses pickled code; a damaged zip raises RuntimeError
        raise CorruptFileError(f"{file} cannot be read as a tensor file with weights_only=True ({short(str(err))}); "
                               "re-save it with AdapterHub's use_safetensors=True") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              and v.is_floating_point() for k, v in state.items()):
        raise CorruptFileError(f"{file} can hold a map of names to float tensors; got {type(state).__name__}")
    return state


def _weights(path: Path, verify: bool) -> tuple[dict[str, tuple[int, ...]], Any]:
    """The file's shapes and a function reading its tensors (safetensors first, as AdapterHub does)."""
    if (path / SAFE_WEIGHTS).is_file():
        weights = open_weights(path, SAFE_WEIGHTS)
        return weights.shapes(), lambda: weights.load(verify, legacy_warning=False)
    if (path / BIN_WEIGHTS).is_file():
        state = _bin_tensors(path / BIN_WEIGHTS)
        return {k: tuple(v.shape) for k, v in state.items()}, lambda: state
    raise XlpeftValueError(f"{path} has neither {SAFE_WEIGHTS} nor {BIN_WEIGHTS}; the AdapterHub adapter "
                           "directory is incomplete, save it again")


def _translate(model: AdaptedModel, keys: list[str], post_norm: bool, path: Path) -> dict[str, str]:
    """AdapterHub key → xlpeft key, refusing unknown keys and files holding several adapters."""
    prefix = getattr(model.model, "base_model_prefix", "") + "."
    out, names, unknown = {}, set(), []
    for key in keys:
        found = xlpeft_key(key.removeprefix(prefix), post_norm)
        if found is None:
            unknown.append(key)
        else:
            out[key], _ = found
            names.add(found[1])
    if unknown:
        raise IncompatibleAdapterError(f"AdapterHub adapter at {path} holds weights xlpeft cannot place: "
                                       f"{[short(k) for k in unknown[:4]]}; bottleneck, invertible and LoRA "
                                       "weights of BERT-like models are supported")
    if len(names) > 1:
        raise CorruptFileError(f"AdapterHub adapter at {path} holds weights of several adapters {sorted(names)}")
    return out


def _post_norm(config: AdapterConfig) -> bool:
    parts = config.configs if isinstance(config, ConfigUnion) else (config,)
    return any(getattr(p, "original_ln_before", False) for p in parts)


def load_adapterhub(model: AdaptedModel, path: str | os.PathLike, meta: dict[str, Any], name: str | None,
                    verify: bool = True) -> str:
    """Load an AdapterHub adapter directory into ``model``; on any error the model is unchanged."""
    path = Path(path)
    _check_backbone(model, meta, path)
    config = config_from_hub(meta["config"], path)
    shapes, read = _weights(path, verify)
    keys = _translate(model, list(shapes), _post_norm(config), path)
    if (path / "head_config.json").is_file():
        warnings.warn(f"{path} also holds an AdapterHub prediction head; xlpeft loads the adapter only",
                      XlpeftWarning, stacklevel=3)
    name = name or (meta.get("name") if isinstance(meta.get("name"), str) else None) or path.name
    model.add_adapter(name, config)
    try:
        expected = {k: tuple(v.shape) for k, v in model.adapter_state_dict(name).items()}
        got = {keys[k]: s for k, s in shapes.items()}
        if got != expected:
            missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
            wrong = [f"{k} {got[k]} vs {expected[k]}" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
            raise IncompatibleAdapterError(
                f"AdapterHub adapter at {path} does not fit this model under its config: missing {missing[:4]}, "
                f"unexpected {extra[:4]}, shapes (file vs expected) {wrong[:4]}; load it into its backbone")
        tensors = read()
        model.load_adapter_state_dict(name, {keys[k]: v.float() if v.dtype == torch.float64 else v
                                             for k, v in tensors.items()})
    except BaseException:
        model.delete_adapter(name)
        raise
    return name


# --------------------------------------------------------------------------- save

BN_DEFAULTS: dict[str, Any] = {  # every field adapters 1.x writes for a BnConfig
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False,
    "non_linearity": "relu", "original_ln_after": True, "original_ln_before": False, "output_adapter": True,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False,
    "phm_rank": 1, "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}
LORA_DEFAULTS: dict[str, Any] = {
    "alpha": 8, "architecture": "lora", "attn_matrices": ["q", "v"], "composition_mode": "add", "dropout": 0.0,
    "dtype": None, "init_weights": "lora", "init_weights_seed": None, "intermediate_lora": False, "leave_out": [],
    "output_lora": False, "r": 8, "selfattn_lora": True, "use_dora": False, "use_gating": False,
    "vera_b": None, "vera_d": None,
}


def _cannot(name: str, why: str) -> XlpeftValueError:
    return XlpeftValueError(f"adapter {name!r} cannot be written in AdapterHub's format: {why}. "
                            "Save it with format='xlpeft'")


def _hub_bottleneck(name: str, bn: BottleneckConfig, inv: InvertibleConfig | None) -> dict[str, Any]:
    if bn.gated or "cross" in bn.placement:
        raise _cannot(name, "gated and cross-attention bottlenecks have no AdapterHub equivalent")
    if inv is not None and inv.non_linearity != bn.non_linearity:
        raise _cannot(name, f"AdapterHub uses one non_linearity for both parts; got {bn.non_linearity!r} "
                            f"and {inv.non_linearity!r}")
    return {**BN_DEFAULTS, "mh_adapter": "attn" in bn.placement, "output_adapter": "ffn" in bn.placement,
            "reduction_factor": bn.reduction_factor, "non_linearity": bn.non_linearity,
            "original_ln_before": bn.original_ln_before, "residual_before_ln": bn.residual_before_ln,
            "is_parallel": bn.mode == "parallel", "init_weights": "mam_adapter" if bn.mode == "parallel" else "bert",
            "scaling": float(bn.scaling), "leave_out": list(bn.leave_out),
            "inv_adapter": "nice" if inv is not None else None,
            "inv_adapter_reduction_factor": inv.reduction_factor if inv is not None else None}


def hub_config(name: str, config: AdapterConfig) -> dict[str, Any]:
    """The AdapterHub ``config`` object of an xlpeft config (refused where AdapterHub has no equivalent)."""
    parts = config.configs if isinstance(config, ConfigUnion) else (config,)
    kinds = {type(p) for p in parts}
    if kinds == {BottleneckConfig} or kinds == {BottleneckConfig, InvertibleConfig}:
        bn = next(p for p in parts if isinstance(p, BottleneckConfig))
        return _hub_bottleneck(name, bn, next((p for p in parts if isinstance(p, InvertibleConfig)), None))
    if kinds == {LoRAConfig}:
        lora = parts[0]
        roles = {"q", "k", "v", "ffn_up", "ffn_down"}
        if lora.gated or lora.target_patterns or not set(lora.targets) <= roles:
            raise _cannot(name, f"AdapterHub LoRA adapts roles {sorted(roles)} only, ungated; got targets "
                                f"{list(lora.targets)}{', target_patterns' if lora.target_patterns else ''}")
        matrices = [m for m in ("q", "k", "v") if m in lora.targets]
        alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
        return {**LORA_DEFAULTS, "alpha": alpha, "r": lora.r, "attn_matrices": matrices,
                "selfattn_lora": bool(matrices), "intermediate_lora": "ffn_up" in lora.targets,
                "output_lora": "ffn_down" in lora.targets, "dropout": lora.dropout, "leave_out": list(lora.leave_out)}
    raise _cannot(name, f"AdapterHub interop covers bottleneck (+ invertible) and LoRA adapters; got "
                        f"{[p.method for p in parts]}")


def save_adapterhub(model: AdaptedModel, name: str, path: str | os.PathLike) -> Path:
    """Write adapter ``name`` so AdapterHub's ``model.load_adapter(path, use_safetensors=True)`` loads it."""
    model.require_adapters(name)
    if model.layout.family not in FAMILIES:
        raise _cannot(name, f"AdapterHub interop covers {', '.join(FAMILIES)} models; this is {model.layout.family!r}")
    config = hub_config(name, model.configs[name])
    state = model.adapter_state_dict(name)
    tensors = {}
    for key, value in state.items():
        if key.endswith("weight_mask"):
            continue
        mask = state.get(key + "_mask")
        value = value * mask if mask is not None else value  # sparsity masks folded in
        tensors[hub_key(key, name)] = value.detach().float().contiguous().cpu()
    hf_config = model.model.config
    meta = {"config": config, "hidden_size": model.backbone.hidden, "model_class": type(model.model).__name__,
            "model_name": getattr(hf_config, "_name_or_path", "") or "", "model_type": hf_config.model_type,
            "name": name, "version": "xlpeft"}
    return write_directory(path, meta, tensors, weights_name=SAFE_WEIGHTS, kind=HUB_ADAPTER)
