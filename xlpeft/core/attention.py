"""Prefix and prompt points: virtual keys/values inside the backbone's attention.

transformers 5 attention modules call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, …)``
with keys and values already split into heads. xlpeft registers one attention
function under ``xlpeft_sdpa`` and ``xlpeft_eager`` (masks are built by the
stock ``sdpa``/``eager`` mask functions, registered under the same names). A
point switches the config its attention module reads to the xlpeft name and
switches it back when the last point on that config goes: nothing of the
model is replaced, it only uses the extension point transformers offers. The
two registered functions are stateless: the points acting inside an attention
module are found through the running call's frames (``Router.attention`` of
each model routing now), so no xlpeft registry outlives a model or spans two.

    module(q, k, v, mask) ─► xlpeft attention ─► points of `module`, running route
        no prefix here ─► original(q, k, v, mask, …)                (the very same call)
        prefixes       ─► original(q, [K ; k], [V ; v], [bias ; mask'], …)

``mask'`` is the model's mask made additive (None becomes zeros, or an explicit
causal mask where sdpa would have relied on ``is_causal``). ``bias`` is 0 on a
prefix position, the dtype's minimum on padding (examples routed to a shorter
prefix or to none) and UniPELT's log-gate where gated. T5's relative position
bias gets zero columns: virtual tokens have no position. Prefixes are never
written into a generation cache; they are prepended at every step.

Composition at one attention: ``Stack``/``Fuse`` concatenate the children's
prefixes; ``Average`` averages keys, values and log-gates of the children that
have a prefix here (equal lengths required), weights renormalised over them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from xlpeft.core.composition import Average, Setup
from xlpeft.errors import XlpeftValueError
from xlpeft.methods.base import ConfigUnion
from xlpeft.methods.prefix import PrefixConfig, PrefixKV
from xlpeft.methods.prompt import PromptConfig  # noqa: F401  (registers the method)
from xlpeft.core import batched
from xlpeft.core.points import AdapterPoint
from xlpeft.core.routing import Router, current_frames

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel

WRAPPED = ("sdpa", "eager")
"""Attention implementations the xlpeft function can wrap."""
_PREFIX = "xlpeft_"
Prefix = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # keys, values, logit bias


# --------------------------------------------------------------------------- attention function
def _original(original: str, module: nn.Module) -> Callable:
    if original == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise XlpeftValueError(
            f"{type(module).__name__}'s module has no eager_attention_forward; "
            "use attn_implementation='sdpa' with prefix or prompt tuning"
        )
    return eager


def _points_at(module: nn.Module) -> list[PrefixPoint]:
    """The points inside ``module`` of every model routing in this context (each model once)."""
    routers: list[Router] = []
    for frame in current_frames():
        if not any(r is frame.router for r in routers):
            routers.append(frame.router)
    return [p for r in routers for p in r.attention.get(module, ())]


def _attention(original: str, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
    call = _original(original, module)
    parts = [p for point in _points_at(module) if (p := point.prefix(query)) is not None]
    if not parts:
        return call(module, query, key, value, attention_mask, **kwargs)
    pk, pv, bias = (torch.cat(t, dim=2 if i < 2 else 3) for i, t in enumerate(zip(*parts)))
    if pk.shape[1] != key.shape[1]:
        raise XlpeftValueError(
            f"{type(module).__name__} attends with {key.shape[1]} key heads but its prefix has "
            f"{pk.shape[1]}; the layout's head count does not fit this model"
        )
    flag = kwargs.get("is_causal")
    causal = (original == "sdpa" and attention_mask is None and query.shape[2] > 1
              and (getattr(module, "is_causal", True) if flag is None else bool(flag)))
    mask = _extend_mask(attention_mask, bias, key.shape[2], causal)
    if kwargs.get("position_bias") is not None:
        kwargs["position_bias"] = F.pad(kwargs["position_bias"], (pk.shape[2], 0))
    return call(module, query, torch.cat([pk, key], 2), torch.cat([pv, value], 2), mask, **kwargs)


def _extend_mask(mask: torch.Tensor | None, bias: torch.Tensor, kv_len: int,
                 causal: bool) -> torch.Tensor:
    """``[bias ; mask]`` as one additive mask ``[B, heads or 1, q, P + kv]``."""
    n, _, q, _ = bias.shape
    low = torch.finfo(bias.dtype).min
    if mask is None:
        base = bias.new_zeros(1, 1, q, kv_len)
        if causal:  # upper-left aligned, as sdpa's is_causal
            keep = torch.ones(q, kv_len, dtype=torch.bool, device=bias.device).tril()
            base = base.masked_fill(~keep, low)
    elif mask.dtype == torch.bool:
        base = bias.new_zeros(mask.shape).masked_fill(~mask, low)
    else:
        base = mask.to(bias.dtype)
    heads = max(base.shape[1], bias.shape[1])
    return torch.cat([bias.expand(n, heads, q, -1), base.expand(n, heads, q, -1)], dim=-1)


def _wrapper(original: str) -> Callable:
    def xlpeft_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        return _attention(original, module, query, key, value, attention_mask, **kwargs)
    xlpeft_attention.__qualname__ = f"xlpeft_attention[{original}]"
    return xlpeft_attention


for _name in WRAPPED:
    AttentionInterface.register(_PREFIX + _name, _wrapper(_name))
    AttentionMaskInterface.register(_PREFIX + _name, ALL_MASK_ATTENTION_FUNCTIONS[_name])


def _switch_on(config: Any, attention: nn.Module) -> None:
    if config is None:
        raise XlpeftValueError(
            f"{type(attention).__name__} has no `config`; prefix and prompt tuning switch the "
            "attention implementation through it"
        )
    current = config._attn_implementation
    if current in [_PREFIX + w for w in WRAPPED]:
        return
    if current not in WRAPPED:
        raise XlpeftValueError(
            f"`attn_implementation` can be 'sdpa', 'eager' for prefix and prompt tuning; got {current!r}. "
            "Load the backbone with attn_implementation='sdpa' (or call set_attn_implementation('sdpa'))"
        )
    config._attn_implementation = _PREFIX + current


def _switch_off(config: Any, router: Router) -> None:
    if any(getattr(m, "config", None) is config for m in router.attention):
        return  # another prefix still uses this config
    name = config._attn_implementation
    if isinstance(name, str) and name.startswith(_PREFIX):
        config._attn_implementation = name[len(_PREFIX):]


# --------------------------------------------------------------------------- points
class PrefixPoint(AdapterPoint):
    """Prefix adapters of one attention module (self- or cross-attention)."""

    projections: tuple[nn.Linear, nn.Linear] | None = None
    """Frozen (k, v) linears that turn soft prompts into keys/values (prompt points only)."""

    def attach(self, attention: nn.Module, *_: nn.Module) -> None:
        _switch_on(getattr(attention, "config", None), attention)
        object.__setattr__(self, "attention", attention)
        # model-level state: a deep copy of the model copies the router with its points and modules
        self.router.attention.setdefault(attention, []).append(self)

    def remove_hooks(self) -> None:
        super().remove_hooks()
        attention = getattr(self, "attention", None)
        if attention is None:
            return
        points = [p for p in self.router.attention.get(attention, []) if p is not self]
        if points:
            self.router.attention[attention] = points
        else:
            self.router.attention.pop(attention, None)
        _switch_off(attention.config, self.router)

    def prefix(self, query: torch.Tensor) -> Prefix | None:
        """Keys/values ``[B, heads, L, d]`` and bias ``[B, 1, q, L]`` for the running route."""
        route = self._route()
        if route is None:
            return None
        if not route.grouped:
            seg = self._segment(route.setups[0], query)
            if seg is None:
                return None
            n = query.shape[0]
            k, v, bias = seg
            return k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), bias[:, None]
        length = max(self._length(s) for s in route.setups)
        if length == 0:
            return None
        if self.router.batched and all(getattr(self._leaf(n), "gate", None) is None for n in route.names):
            gid = route.group_ids(query.shape[0], query.device)
            return batched.prefix(route.setups, gid, lambda s: self._key_values(s, query), length, query)
        packed = route.dispatch(lambda setup, q: self._pack(setup, q, length), query)
        d = (packed.shape[-1] - query.shape[2]) // 2
        return packed[..., :d], packed[..., d:2 * d], packed[:, :1, :, 2 * d:].transpose(-1, -2)

    def _key_values(self, setup: Setup, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An ungated setup's keys and values ``[heads, P, d]`` (None: no prefix here)."""
        seg = self._segment(setup, q[:1])
        return None if seg is None else (seg[0], seg[1])

    def _pack(self, setup: Setup, q: torch.Tensor, length: int) -> torch.Tensor:
        """One group's ``[n, heads, length, 2d + q]``: keys | values | bias, padded to ``length``."""
        n, heads, q_len, d = q.shape
        seg = self._segment(setup, q)
        if seg is None:
            seg = (q.new_zeros(heads, 0, d), q.new_zeros(heads, 0, d), q.new_zeros(n, q_len, 0))
        k, v, bias = seg
        pad = length - k.shape[1]
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        bias = F.pad(bias, (0, pad), value=torch.finfo(q.dtype).min)
        return torch.cat([k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1),
                          bias.transpose(1, 2)[:, None].expand(-1, heads, -1, -1)], dim=-1)

    def _length(self, setup: Setup) -> int:
        if isinstance(setup, str):
            module = self._leaf(setup)
            return 0 if module is None else module.length
        lengths = [self._length(c) for c in setup.children]
        return max(lengths) if isinstance(setup, Average) else sum(lengths)

    def _segment(self, setup: Setup, q: torch.Tensor) -> Prefix | None:
        """Keys, values ``[heads, P, d]`` and bias ``[n, q, P]`` of one setup; None if empty."""
        if isinstance(setup, str):
            return self._leaf_segment(setup, q)
        weights = setup.weights if isinstance(setup, Average) else [1.0] * len(setup.children)
        pairs = [(w, s) for c, w in zip(setup.children, weights)
                 if (s := self._segment(c, q)) is not None]
        if not pairs:
            return None
        if not isinstance(setup, Average):
            return tuple(torch.cat([s[i] for _, s in pairs], dim=-2 if i < 2 else -1) for i in range(3))
        lengths = sorted({s[0].shape[1] for _, s in pairs})
        if len(lengths) > 1:
            raise XlpeftValueError(
                f"Average can mix prefixes of one length; got lengths {lengths} in {setup!r}; "
                "give the averaged adapters the same prefix_length"
            )
        total = sum(w for w, _ in pairs)
        return tuple(sum(w / total * s[i] for w, s in pairs) for i in range(3))

    def _leaf_segment(self, name: str, q: torch.Tensor) -> Prefix | None:
        module = self._leaf(name)
        if module is None:
            return None
        k, v = module.key_values(self.projections)
        n, _, q_len, _ = q.shape
        gate = module.logit_bias(q)
        bias = (q.new_zeros(n, q_len, k.shape[1]) if gate is None
                else gate.to(q.dtype).expand(n, q_len, k.shape[1]))
        return k.to(q.dtype), v.to(q.dtype), bias


class _Announcing(nn.ModuleDict):
    """A ``ModuleDict`` that tells its point when an adapter module arrives."""

    def __init__(self, on_add: Callable[[nn.Module], None]) -> None:
        super().__init__()
        object.__setattr__(self, "on_add", on_add)

    def __setitem__(self, key: str, module: nn.Module) -> None:
        super().__setitem__(key, module)
        self.on_add(module)


class PromptPoint(PrefixPoint):
    """Soft prompts at a stack's first self-attention (see ``methods/prompt.py``)."""

    def __init__(self, router: Router, stacks: tuple[str, ...]) -> None:
        super().__init__(router, stacks)
        self.adapters = _Announcing(self._added)

    def attach(self, attention: nn.Module, *modules: nn.Module) -> None:
        k, v, embeddings = modules
        super().attach(attention)
        object.__setattr__(self, "projections", (k, v))
        object.__setattr__(self, "embeddings", embeddings)

    def _added(self, module: nn.Module) -> None:
        if getattr(module, "from_vocab", False):
            module.init_from_vocabulary(self.embeddings.weight)


# --------------------------------------------------------------------------- collapse
def collapse_prefix(model: AdaptedModel, name: str) -> None:
    """Evaluate adapter ``name``'s prefix MLP once and keep only the per-layer tensors.

    Outputs stay the same; the MLP is dropped and the config becomes
    ``reparametrize=False``, so saving writes (and loading rebuilds) the small form.
    """
    model.require_adapters(name)
    config = model.configs[name]
    part = next((p for p in config.parts if isinstance(p, PrefixConfig)), None)
    if part is None:
        raise XlpeftValueError(
            f"adapter {name!r} is {config.method!r}; collapse applies to adapters with a prefix part"
        )
    if not part.reparametrize:
        return  # already collapsed (or trained directly)
    for point in model.points.values():
        module = point.adapters[name] if name in point.adapters else None
        if isinstance(point, PrefixPoint) and isinstance(module, PrefixKV):
            point.adapters[name] = module.collapsed()
    holder = model.shared[name]
    del holder[part.method]
    if not len(holder):
        del model.shared[name]
    flat = part.replace(reparametrize=False)
    model.configs[name] = flat if isinstance(config, PrefixConfig) else ConfigUnion(
        tuple(flat if c is part else c for c in config.parts))
