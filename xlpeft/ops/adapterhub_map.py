"""AdapterHub ↔ xlpeft, per method: configs and tensors (``xlpeft.ops.adapterhub`` does the files).

    bottleneck  encoder.layer.3.output.adapters.<n>.adapter_down.0.weight ↔ encoder.3.ffn[_ln].down.weight
    invertible  invertible_adapters.<n>.F.0.weight                       ↔ shared.invertible.F.0.weight
    LoRA        encoder.layer.3.attention.self.query.loras.<n>.lora_A     ↔ encoder.3.attention.self.query.lora_A.weight
    Compacter   …adapters.<n>.adapter_up.{W_left, W_right, phm_rule, b}   ↔ encoder.3.ffn.up.{right, leftᵀ, ruleᵀ, bias}
                (AdapterHub: y = x·Σ Aᵢ⊗(LᵢRᵢ); xlpeft: y = x·(Σ Aᵢᵀ⊗(RᵢᵀLᵢᵀ))ᵀ, the same map)
    prefix      prefix_tuning.prefix_tunings.<n>.self_prefix.wte / control_trans.0 ↔ shared.prefix.embedding / down
                control_trans.2 rows [l·2HD, (l+1)·2HD) ↔ encoder.l.self_attn.out (one block per layer);
                AdapterHub also stores a copy of the pool under every layer's attention.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from xlpeft.errors import CorruptFileError, XlpeftValueError
from xlpeft.methods.base import AdapterConfig, ConfigUnion, short
from xlpeft.methods.bottleneck import BottleneckConfig
from xlpeft.methods.compacter import CompacterConfig
from xlpeft.methods.invertible import InvertibleConfig
from xlpeft.methods.lora import LoRAConfig
from xlpeft.methods.prefix import PrefixConfig

ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "swish", "tanh": "tanh"}
_NUMBER = (int, float)
# (field, is-default test, what it is): AdapterHub features xlpeft cannot reproduce, refused by name
_BN_UNSUPPORTED = (
    ("ln_before", lambda v: not v, "an adapter LayerNorm before it"),
    ("ln_after", lambda v: not v, "an adapter LayerNorm after it"),
    ("adapter_residual_before_ln", lambda v: not v, "the adapter residual before its own LayerNorm"),
    ("original_ln_after", lambda v: v is None or v is True, "no block LayerNorm after the adapter"),
    ("use_gating", lambda v: not v, "gating"),
    ("cross_adapter", lambda v: not v, "cross-attention adapters"),
    ("stochastic_depth", lambda v: not v, "stochastic depth"),
    ("scaling", lambda v: isinstance(v, _NUMBER) and not isinstance(v, bool), "learned scaling"),
    ("inv_adapter", lambda v: v in (None, "nice"), "a GLOW coupling"),
)
_PHM_UNSUPPORTED = (
    ("original_ln_before", lambda v: not v, "Compacter++ after the block LayerNorm (SeqBn placement)"),
    ("is_parallel", lambda v: not v, "a parallel Compacter"),
    ("factorized_phm_rule", lambda v: not v, "factorised PHM rules"),
    ("shared_W_phm", lambda v: not v, "PHM weights shared across layers"),
    ("phm_bias", lambda v: v is None or v is True, "PHM layers without bias"),
    ("scaling", lambda v: v == 1.0, "a scaled Compacter"),
)
_LORA_UNSUPPORTED = (
    ("composition_mode", lambda v: v in (None, "add"), "(IA)3 (composition_mode 'scale')"),
    ("use_gating", lambda v: not v, "gating"),
    ("use_dora", lambda v: not v, "DoRA"),
    ("vera_d", lambda v: v is None, "VeRA"),
    ("vera_b", lambda v: v is None, "VeRA"),
)
_PREFIX_UNSUPPORTED = (
    ("use_gating", lambda v: not v, "gated prefixes"),
    ("leave_out", lambda v: not v, "prefixes left out of some layers"),
)


# --------------------------------------------------------------------------- configs


def _refuse(config: dict[str, Any], table: tuple, path: Path) -> None:
    bad = [f"{k}={short(config[k])} ({what})" for k, ok, what in table if k in config and not ok(config[k])]
    if bad:
        raise XlpeftValueError(f"AdapterHub adapter at {path} uses features xlpeft does not support: "
                               f"{'; '.join(bad)}. Retrain it without them, or use AdapterHub itself")


def _number(config: dict[str, Any], key: str, path: Path, default: Any = None) -> float:
    value = config.get(key, default)
    if isinstance(value, dict) and set(value) == {"default"}:
        value = value["default"]
    if not isinstance(value, _NUMBER) or isinstance(value, bool) or value <= 0:
        raise XlpeftValueError(f"AdapterHub config at {path}: `{key}` can be a number > 0 (one for all "
                               f"layers); got {short(value)}. Per-layer values are not supported")
    return float(value)


def _int(config: dict[str, Any], key: str, path: Path, default: int) -> int:
    value = config.get(key, default)
    if type(value) is not int or value < 1:
        raise CorruptFileError(f"AdapterHub config at {path}: `{key}` can be an integer ≥ 1; got {short(value)}")
    return value


def _leave_out(config: dict[str, Any], path: Path) -> tuple[int, ...]:
    value = config.get("leave_out") or []
    if not isinstance(value, list) or not all(type(i) is int for i in value):
        raise CorruptFileError(f"AdapterHub config at {path}: `leave_out` can be a list of layer indices; "
                               f"got {short(value)}")
    return tuple(value)


def _activation(config: dict[str, Any], path: Path, default: str = "relu") -> str:
    name = str(config.get("non_linearity") or default).lower()
    if name not in ACTIVATIONS:
        raise XlpeftValueError(f"AdapterHub config at {path}: `non_linearity` can be "
                               f"{', '.join(ACTIVATIONS)} for xlpeft; got {short(name)}")
    return ACTIVATIONS[name]


def _placement(config: dict[str, Any], path: Path) -> tuple[str, ...]:
    placement = tuple(p for p, key in (("attn", "mh_adapter"), ("ffn", "output_adapter")) if config.get(key))
    if not placement:
        raise XlpeftValueError(f"AdapterHub config at {path} has neither mh_adapter nor output_adapter; "
                               "it places no adapter")
    return placement


def _bottleneck(config: dict[str, Any], path: Path) -> AdapterConfig:
    _refuse(config, _BN_UNSUPPORTED, path)
    parallel, residual = bool(config.get("is_parallel")), config.get("residual_before_ln", True)
    common = dict(reduction_factor=_number(config, "reduction_factor", path), placement=_placement(config, path),
                  non_linearity=_activation(config, path), leave_out=_leave_out(config, path))
    if config.get("phm_layer"):
        _refuse(config, _PHM_UNSUPPORTED, path)
        part: AdapterConfig = CompacterConfig(
            **common, phm_dim=_int(config, "phm_dim", path, 4), phm_rank=_int(config, "phm_rank", path, 1),
            shared_phm_rule=bool(config.get("shared_phm_rule", True)),
            factorized_phm_w=bool(config.get("factorized_phm_W", True)), init_zero_up=False)
    else:
        part = BottleneckConfig(**common, mode="parallel" if parallel else "sequential",
                                scaling=float(config.get("scaling", 1.0)), init_zero_up=False,
                                original_ln_before=bool(config.get("original_ln_before")) and not parallel,
                                residual_before_ln=residual if residual in (True, False, "post_add") else True)
    if config.get("inv_adapter") != "nice":
        return part
    inverse = InvertibleConfig(reduction_factor=_number(config, "inv_adapter_reduction_factor", path),
                               non_linearity=_activation(config, path), init_zero=False)
    return ConfigUnion((part, inverse))


def _lora(config: dict[str, Any], path: Path) -> LoRAConfig:
    _refuse(config, _LORA_UNSUPPORTED, path)
    matrices = config.get("attn_matrices", ["q", "v"]) if config.get("selfattn_lora", True) else []
    if not isinstance(matrices, list) or any(m not in ("q", "k", "v") for m in matrices):
        raise XlpeftValueError(f"AdapterHub LoRA at {path}: `attn_matrices` can list q, k, v; got {short(matrices)}")
    targets = [*matrices, *["ffn_up"] * bool(config.get("intermediate_lora")),
               *["ffn_down"] * bool(config.get("output_lora"))]
    return LoRAConfig(r=_int(config, "r", path, 8), alpha=_number(config, "alpha", path, 8), targets=tuple(targets),
                      dropout=float(config.get("dropout") or 0.0), leave_out=_leave_out(config, path),
                      init_zero_b=False)


def _prefix(config: dict[str, Any], path: Path) -> PrefixConfig:
    _refuse(config, _PREFIX_UNSUPPORTED, path)
    return PrefixConfig(prefix_length=_int(config, "prefix_length", path, 30),
                        bottleneck_size=_int(config, "bottleneck_size", path, 512),
                        non_linearity=_activation(config, path, "tanh"), reparametrize=not config.get("flat"),
                        cross_attention=bool(config.get("cross_prefix", True)))


LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}
"""adapter-transformers files without a ``version`` meant the tanh GELU by ``gelu`` (as AdapterHub reads them)."""


def config_from_hub(config: Any, path: Path, legacy: bool = False) -> AdapterConfig:
    """The xlpeft config computing what an AdapterHub config computes (refused where it cannot)."""
    if not isinstance(config, dict):
        raise CorruptFileError(f"AdapterHub config at {path}: `config` can be an object; got {short(config)} "
                               "(a config name only: load it into AdapterHub, save it again)")
    if legacy and config.get("non_linearity") in LEGACY_ACTIVATIONS:
        config = {**config, "non_linearity": LEGACY_ACTIVATIONS[config["non_linearity"]]}
    architecture = config.get("architecture") or "bottleneck"
    readers = {"bottleneck": _bottleneck, "lora": _lora, "prefix_tuning": _prefix}
    if architecture not in readers:
        raise XlpeftValueError(f"AdapterHub `architecture` can be {', '.join(map(repr, readers))} for xlpeft; "
                               f"got {short(architecture)} at {path}. Prompt tuning, ReFT and unions are not "
                               "converted")
    return readers[architecture](config, path)


# --------------------------------------------------------------------------- tensors

_SUB = {"attention.output": "attn", "output": "ffn"}
_HUB_BN = re.compile(r"encoder\.layer\.(\d+)\.(attention\.output|output)\.adapters\.([^.]+)\.adapter_(down\.0|up)\."
                     r"(weight|bias|W_left|W_right|W|phm_rule|b)")
_HUB_INV = re.compile(r"invertible_adapters\.([^.]+)\.([FG]\.[02]\.(?:weight|bias))")
_HUB_LORA = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.loras\.([^.]+)\.lora_([AB])")
_HUB_RULE = re.compile(r"shared_parameters\.([^.]+)\.phm_rule")
_HUB_PREFIX = re.compile(r"prefix_tuning\.prefix_tunings\.([^.]+)\.self_prefix\.(wte\.weight|control_trans"
                         r"(?:\.[02]\.(?:weight|bias))?)")
_HUB_PREFIX_COPY = re.compile(r"encoder\.layer\.\d+\.attention\.self\.prefix_tuning\.pool\.prefix_tunings\.([^.]+)\."
                              r"self_prefix\..+")
_PHM = {"W_left": "right", "W_right": "left", "W": "phm", "phm_rule": "rule", "b": "bias"}
_T = ("W_right", "W", "phm_rule")  # stored transposed (last two axes) on the other side
_PREFIX_SHARED = {"wte.weight": "embedding.weight", "control_trans.0.weight": "down.weight",
                  "control_trans.0.bias": "down.bias"}


def _t(v: torch.Tensor) -> torch.Tensor:
    return v.transpose(1, 2).contiguous()


def hub_name_of(key: str) -> str | None:
    """The AdapterHub adapter name inside ``key``; None for a key no supported method writes."""
    for pattern, group in ((_HUB_BN, 3), (_HUB_INV, 1), (_HUB_LORA, 3), (_HUB_RULE, 1), (_HUB_PREFIX, 1),
                           (_HUB_PREFIX_COPY, 1)):
        if m := pattern.fullmatch(key):
            return m[group]
    return None


def from_hub(tensors: dict[str, torch.Tensor], post_norm: bool, expected: dict[str, tuple[int, ...]],
             path: Path) -> tuple[dict[str, torch.Tensor], set[str], list[str]]:
    """(xlpeft state, the AdapterHub adapter names seen, keys no method knows)."""
    out, names, unknown, prefix = {}, set(), [], {}
    for key, v in tensors.items():
        if m := _HUB_BN.fullmatch(key):
            sub = _SUB[m[2]] + ("_ln" if post_norm else "")
            part = m[4].removesuffix(".0")
            leaf = m[5] if m[5] in ("weight", "bias") else _PHM[m[5]]
            out[f"encoder.{m[1]}.{sub}.{part}.{leaf}"], name = (_t(v) if m[5] in _T else v), m[3]
        elif m := _HUB_INV.fullmatch(key):
            out[f"shared.invertible.{m[2]}"], name = v, m[1]
        elif m := _HUB_LORA.fullmatch(key):
            out[f"encoder.{m[1]}.{m[2]}.lora_{m[4]}.weight"], name = v, m[3]
        elif m := _HUB_RULE.fullmatch(key):
            out["shared.compacter.rule"], name = _t(v), m[1]
        elif m := _HUB_PREFIX.fullmatch(key):
            prefix[m[2]], name = v, m[1]
        elif m := _HUB_PREFIX_COPY.fullmatch(key):
            name = m[1]  # the same pool, stored again under each layer
        else:
            unknown.append(key)
            continue
        names.add(name)
    if prefix:
        out.update(_prefix_from_hub(prefix, expected, path))
    return out, names, unknown


def _layers(expected: dict[str, tuple[int, ...]], leaf: str) -> list[str]:
    keys = [k for k in expected if re.fullmatch(rf"encoder\.\d+\.self_attn\.{leaf}", k)]
    return sorted(keys, key=lambda k: int(k.split(".")[1]))


def _prefix_from_hub(parts: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                     path: Path) -> dict[str, torch.Tensor]:
    out = {f"shared.prefix.{_PREFIX_SHARED[k]}": v for k, v in parts.items() if k in _PREFIX_SHARED}
    try:
        if "control_trans" in parts:  # flat: (P, layers, 2, heads, head_dim) → per layer (2, heads, P, head_dim)
            keys = _layers(expected, "kv")
            two, heads, length, dim = expected[keys[0]]
            flat = parts["control_trans"].view(length, len(keys), two, heads, dim)
            out.update({k: flat[:, i].permute(1, 2, 0, 3).contiguous() for i, k in enumerate(keys)})
        for leaf in ("weight", "bias"):
            if f"control_trans.2.{leaf}" in parts:
                keys = _layers(expected, f"out.{leaf}")
                out.update(zip(keys, parts[f"control_trans.2.{leaf}"].chunk(len(keys))))
    except (RuntimeError, IndexError, KeyError) as err:  # sizes that do not tile the layers
        raise CorruptFileError(f"AdapterHub prefix at {path} does not fit this model's layers and heads "
                               f"({err}); load it into the backbone it was trained with") from err
    return out


def to_hub(state: dict[str, torch.Tensor], name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """AdapterHub's tensors for an xlpeft adapter state (the inverse of ``from_hub``)."""
    parts = config.configs if isinstance(config, ConfigUnion) else (config,)
    phm = {v: k for k, v in _PHM.items()}
    out, per_layer = {}, {}
    for key, v in state.items():
        if m := re.fullmatch(r"encoder\.(\d+)\.(attn|ffn)(?:_ln)?\.(down|up)\.(\w+)", key):
            module = "attention.output" if m[2] == "attn" else "output"
            part = "down.0" if m[3] == "down" else "up"
            leaf = m[4] if not any(isinstance(p, CompacterConfig) for p in parts) else phm[m[4]]
            out[f"encoder.layer.{m[1]}.{module}.adapters.{name}.adapter_{part}.{leaf}"] = _t(v) if leaf in _T else v
        elif key.startswith("shared.invertible."):
            out[f"invertible_adapters.{name}.{key.removeprefix('shared.invertible.')}"] = v
        elif m := re.fullmatch(r"encoder\.(\d+)\.(.+)\.lora_([AB])\.weight", key):
            out[f"encoder.layer.{m[1]}.{m[2]}.loras.{name}.lora_{m[3]}"] = v
        elif key == "shared.compacter.rule":
            out[f"shared_parameters.{name}.phm_rule"] = _t(v)
        elif key.startswith("shared.prefix."):
            hub = {b: a for a, b in _PREFIX_SHARED.items()}[key.removeprefix("shared.prefix.")]
            per_layer.setdefault("shared", {})[hub] = v
        elif m := re.fullmatch(r"encoder\.(\d+)\.self_attn\.(out\.weight|out\.bias|kv)", key):
            per_layer.setdefault(m[2], {})[int(m[1])] = v
        else:
            raise XlpeftValueError(f"xlpeft key {key!r} has no AdapterHub name; save with format='xlpeft'")
    if per_layer:
        out.update(_prefix_to_hub(per_layer, name, len(per_layer.get("out.weight", per_layer.get("kv", {})))))
    return out


def _prefix_to_hub(per_layer: dict[str, dict], name: str, layers: int) -> dict[str, torch.Tensor]:
    pool = dict(per_layer.get("shared", {}))
    for leaf in ("weight", "bias"):
        if f"out.{leaf}" in per_layer:
            pool[f"control_trans.2.{leaf}"] = torch.cat([per_layer[f"out.{leaf}"][i] for i in range(layers)])
    if "kv" in per_layer:  # per layer (2, heads, P, head_dim) → flat (P, layers, 2, heads, head_dim)
        stacked = torch.stack([per_layer["kv"][i].permute(2, 0, 1, 3) for i in range(layers)], dim=1)
        pool["control_trans"] = stacked.reshape(-1).contiguous()
    out = {f"prefix_tuning.prefix_tunings.{name}.self_prefix.{k}": v for k, v in pool.items()}
    for i in range(layers):  # AdapterHub's own files hold the pool once more under every layer
        out.update({f"encoder.layer.{i}.attention.self.prefix_tuning.pool.prefix_tunings.{name}.self_prefix.{k}":
                    v.clone() for k, v in pool.items()})
    return out
