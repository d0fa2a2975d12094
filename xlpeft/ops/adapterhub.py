"""AdapterHub ``adapters`` interop: read and write its adapter directories (BERT/mBERT, XLM-R).

AdapterHub (``adapters`` 1.x, ``model.save_adapter``) writes ``adapter_config.json``
(``{"config": {...}, "model_type", "hidden_size", "name", ...}``) and
``adapter.safetensors`` or ``pytorch_adapter.bin`` (read here with
``torch.load(weights_only=True)``, memory-mapped), keyed by module paths of the
bare model (a head model's ``bert.``/``roberta.`` prefix is dropped on load)::

    adapter_config.json ─► config_from_hub ─► xlpeft config ─► add_adapter (built aside)
    header keys/shapes  ─► compared with to_hub(the new adapter's state) ─► read the data
    tensors ─► from_hub ─► load_adapter_state_dict            (any error: the adapter is removed)

Bottleneck (SeqBn, DoubleSeqBn, Bn, ParBn), NICE invertible, LoRA, prefix tuning
and Compacter map exactly (``xlpeft.ops.adapterhub_map``); features xlpeft lacks
are refused by name. AdapterHub 1.x does not save the shared PHM rule of a
Compacter (``shared_phm_rule=true``), so such files cannot reproduce their
adapter and are refused; per-layer rules (``shared_phm_rule=false``) load.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from xlpeft.errors import CorruptFileError, IncompatibleAdapterError, XlpeftValueError, XlpeftWarning
from xlpeft.methods.base import AdapterConfig, ConfigUnion, short
from xlpeft.methods.bottleneck import BottleneckConfig
from xlpeft.methods.compacter import CompacterConfig
from xlpeft.methods.invertible import InvertibleConfig
from xlpeft.methods.lora import LoRAConfig
from xlpeft.methods.prefix import PrefixConfig
from xlpeft.ops.adapterhub_map import config_from_hub, from_hub, hub_name_of, to_hub
from xlpeft.ops.artefacts import ArtefactKind
from xlpeft.ops.files import CONFIG_NAME, write_directory
from xlpeft.ops.weights import open_weights

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel

SAFE_WEIGHTS = "adapter.safetensors"
BIN_WEIGHTS = "pytorch_adapter.bin"
FAMILIES = ("bert", "xlm-roberta")


def is_adapterhub(meta: Any) -> bool:
    """An AdapterHub ``adapter_config.json``: a config plus the model fields, no xlpeft backbone record."""
    return isinstance(meta, dict) and "config" in meta and "model_type" in meta and "backbone" not in meta


HUB_ADAPTER = ArtefactKind("AdapterHub adapter", CONFIG_NAME, (CONFIG_NAME, SAFE_WEIGHTS), is_adapterhub)


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
    """``pytorch_adapter.bin`` with ``weights_only=True`` (memory-mapped: nothing read before the checks)."""
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


def _hub_name(shapes: dict[str, tuple[int, ...]], path: Path) -> str:
    """The one adapter name in the file's keys; unknown keys and several adapters are refused."""
    names = {k: hub_name_of(k) for k in shapes}
    unknown = [k for k, n in names.items() if n is None]
    if unknown:
        raise IncompatibleAdapterError(f"AdapterHub adapter at {path} holds weights xlpeft cannot place: "
                                       f"{[short(k) for k in unknown[:4]]}; bottleneck, invertible, LoRA, prefix "
                                       "and Compacter weights of BERT-like models are supported")
    found = set(names.values())
    if len(found) != 1:
        raise CorruptFileError(f"AdapterHub adapter at {path} holds weights of {len(found)} adapters "
                               f"{sorted(found)}; a directory holds one")
    return found.pop()


def _parts(config: AdapterConfig) -> tuple[AdapterConfig, ...]:
    return config.configs if isinstance(config, ConfigUnion) else (config,)


def _compare(got: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], path: Path) -> None:
    if got == expected:
        return
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} vs {expected[k]}" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
    raise IncompatibleAdapterError(
        f"AdapterHub adapter at {path} does not fit this model under its config: missing {missing[:4]}, "
        f"unexpected {extra[:4]}, shapes (file vs expected) {wrong[:4]}; load it into its backbone")


def load_adapterhub(model: AdaptedModel, path: str | os.PathLike, meta: dict[str, Any], name: str | None,
                    verify: bool = True) -> str:
    """Load an AdapterHub adapter directory into ``model``; on any error the model is unchanged."""
    path = Path(path)
    _check_backbone(model, meta, path)
    config = config_from_hub(meta["config"], path, legacy="version" not in meta)
    shapes, read = _weights(path, verify)
    prefix = getattr(model.model, "base_model_prefix", "") + "."
    shapes = {k.removeprefix(prefix): s for k, s in shapes.items()}
    hub_name = _hub_name(shapes, path)
    if any(isinstance(p, CompacterConfig) and p.shared_phm_rule for p in _parts(config)) and \
            f"shared_parameters.{hub_name}.phm_rule" not in shapes:
        raise XlpeftValueError(f"AdapterHub Compacter at {path} has a shared PHM rule (shared_phm_rule=true) that "
                               "AdapterHub 1.x does not save, so no one can reproduce this adapter from the file "
                               "(AdapterHub itself re-initialises the rule); retrain with shared_phm_rule=False")
    if (path / "head_config.json").is_file():
        warnings.warn(f"{path} also holds an AdapterHub prediction head; xlpeft loads the adapter only",
                      XlpeftWarning, stacklevel=3)
    name = name or (meta.get("name") if isinstance(meta.get("name"), str) else None) or path.name
    model.add_adapter(name, config)
    try:
        state = model.adapter_state_dict(name)
        mine = {k: tuple(v.shape) for k, v in state.items()}
        _compare(shapes, {k: tuple(v.shape) for k, v in to_hub(state, hub_name, config).items()}, path)
        tensors = {k.removeprefix(prefix): v.float() if v.dtype == torch.float64 else v for k, v in read().items()}
        post_norm = any(getattr(p, "original_ln_before", False) for p in _parts(config))
        loaded, _, _ = from_hub(tensors, post_norm, mine, path)
        model.load_adapter_state_dict(name, loaded)
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
PREFIX_DEFAULTS: dict[str, Any] = {
    "architecture": "prefix_tuning", "bottleneck_size": 512, "cross_prefix": True, "dropout": 0.0,
    "encoder_prefix": True, "flat": False, "init_weights_seed": None, "leave_out": [], "non_linearity": "tanh",
    "prefix_length": 30, "shared_gating": True, "use_gating": False,
}


def _cannot(name: str, why: str) -> XlpeftValueError:
    return XlpeftValueError(f"adapter {name!r} cannot be written in AdapterHub's format: {why}. "
                            "Save it with format='xlpeft'")


def _hub_bottleneck(name: str, part: BottleneckConfig | CompacterConfig, inv: InvertibleConfig | None) -> dict:
    if getattr(part, "gated", False) or "cross" in part.placement:
        raise _cannot(name, "gated and cross-attention adapters have no AdapterHub equivalent")
    if inv is not None and inv.non_linearity != part.non_linearity:
        raise _cannot(name, f"AdapterHub uses one non_linearity for both parts; got {part.non_linearity!r} "
                            f"and {inv.non_linearity!r}")
    out = {**BN_DEFAULTS, "mh_adapter": "attn" in part.placement, "output_adapter": "ffn" in part.placement,
           "reduction_factor": part.reduction_factor, "non_linearity": part.non_linearity,
           "leave_out": list(part.leave_out), "inv_adapter": "nice" if inv is not None else None,
           "inv_adapter_reduction_factor": inv.reduction_factor if inv is not None else None}
    if isinstance(part, CompacterConfig):
        if part.shared_phm_rule:
            raise _cannot(name, "AdapterHub 1.x does not save a Compacter's shared PHM rule, so it could not load "
                                "this adapter back; use CompacterConfig(shared_phm_rule=False)")
        return {**out, "phm_layer": True, "phm_dim": part.phm_dim, "phm_rank": part.phm_rank,
                "shared_phm_rule": False, "factorized_phm_W": part.factorized_phm_w, "phm_init_range":
                part.phm_init_range}
    parallel = part.mode == "parallel"
    return {**out, "original_ln_before": part.original_ln_before, "residual_before_ln": part.residual_before_ln,
            "is_parallel": parallel, "init_weights": "mam_adapter" if parallel else "bert",
            "scaling": float(part.scaling)}


def _hub_lora(name: str, lora: LoRAConfig) -> dict[str, Any]:
    roles = {"q", "k", "v", "ffn_up", "ffn_down"}
    if lora.gated or lora.target_patterns or not set(lora.targets) <= roles:
        raise _cannot(name, f"AdapterHub LoRA adapts roles {sorted(roles)} only, ungated; got targets "
                            f"{list(lora.targets)}{', target_patterns' if lora.target_patterns else ''}")
    matrices = [m for m in ("q", "k", "v") if m in lora.targets]
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return {**LORA_DEFAULTS, "alpha": alpha, "r": lora.r, "attn_matrices": matrices, "selfattn_lora": bool(matrices),
            "intermediate_lora": "ffn_up" in lora.targets, "output_lora": "ffn_down" in lora.targets,
            "dropout": lora.dropout, "leave_out": list(lora.leave_out)}


def _hub_prefix(name: str, prefix: PrefixConfig) -> dict[str, Any]:
    if prefix.gated or prefix.leave_out:
        raise _cannot(name, "gated prefixes and prefixes left out of layers are written differently by AdapterHub")
    return {**PREFIX_DEFAULTS, "prefix_length": prefix.prefix_length, "bottleneck_size": prefix.bottleneck_size,
            "non_linearity": prefix.non_linearity, "flat": not prefix.reparametrize,
            "cross_prefix": prefix.cross_attention}


def hub_config(name: str, config: AdapterConfig) -> dict[str, Any]:
    """The AdapterHub ``config`` object of an xlpeft config (refused where AdapterHub has no equivalent)."""
    parts = _parts(config)
    kinds = {type(p) for p in parts}
    inv = next((p for p in parts if isinstance(p, InvertibleConfig)), None)
    for bn_kind in (BottleneckConfig, CompacterConfig):
        if kinds in ({bn_kind}, {bn_kind, InvertibleConfig}):
            return _hub_bottleneck(name, next(p for p in parts if isinstance(p, bn_kind)), inv)
    if kinds == {LoRAConfig}:
        return _hub_lora(name, parts[0])
    if kinds == {PrefixConfig}:
        return _hub_prefix(name, parts[0])
    raise _cannot(name, f"AdapterHub interop covers bottleneck or Compacter (+ invertible), LoRA and prefix "
                        f"adapters; got {[p.method for p in parts]}")


def save_adapterhub(model: AdaptedModel, name: str, path: str | os.PathLike) -> Path:
    """Write adapter ``name`` so AdapterHub's ``model.load_adapter(path, use_safetensors=True)`` loads it."""
    model.require_adapters(name)
    if model.layout.family not in FAMILIES:
        raise _cannot(name, f"AdapterHub interop covers {', '.join(FAMILIES)} models; this is {model.layout.family!r}")
    config = hub_config(name, model.configs[name])
    state = model.adapter_state_dict(name)
    plain = {}
    for key, value in state.items():
        if not key.endswith("weight_mask"):
            mask = state.get(key + "_mask")
            plain[key] = (value * mask if mask is not None else value).detach().float().cpu()  # masks folded in
    tensors = {k: v.contiguous() for k, v in to_hub(plain, name, model.configs[name]).items()}
    hf_config = model.model.config
    meta = {"config": config, "hidden_size": model.backbone.hidden, "model_class": type(model.model).__name__,
            "model_name": getattr(hf_config, "_name_or_path", "") or "", "model_type": hf_config.model_type,
            "name": name, "version": "xlpeft"}
    return write_directory(path, meta, tensors, weights_name=SAFE_WEIGHTS, kind=HUB_ADAPTER)
