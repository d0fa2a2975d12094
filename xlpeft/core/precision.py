"""Placement and precision of adapter modules, decided per point.

Every adapter module lives on the device of the backbone module it adapts
(its *anchor*), so a model spread over devices, or one whose modules keep
different dtypes (T5's ``wo`` in float32 in a float16 model), works. On a
float16/bfloat16 anchor its parameters are float32 by default: low-precision
adapter weights lose most optimiser updates (bf16 has 8 significant bits, so
``w - 1e-4·sign(g)`` rounds back to ``w`` for most ``|w| > 0.004``).

    backbone (bf16) ─► y ─► [cast to fp32] ─► adapter (fp32) ─► [cast to bf16] ─► y'

The casts are forward hooks on the adapter module itself, registered only
where the adapter's dtype differs from its anchor's, so outputs keep the
backbone's dtype and points never see a foreign dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from xlpeft.errors import XlpeftValueError

LOW_PRECISION = (torch.float16, torch.bfloat16)
AdapterDtype = torch.dtype | str | None


def check_adapter_dtype(option: AdapterDtype) -> AdapterDtype:
    """``adapter_dtype`` can be None (float32 on fp16/bf16 modules), "backbone" or a float dtype."""
    if option is None or option == "backbone":
        return option
    if isinstance(option, torch.dtype) and option.is_floating_point:
        return option
    raise XlpeftValueError(
        f"`adapter_dtype` can be None (float32 where the backbone is float16/bfloat16), "
        f"'backbone' or a floating torch dtype such as torch.float32; got {option!r}"
    )


def resolve_dtype(option: AdapterDtype, anchor_dtype: torch.dtype) -> torch.dtype:
    """The dtype an adapter gets at a point whose backbone module has ``anchor_dtype``."""
    if option == "backbone":
        return anchor_dtype
    if option is None:
        return torch.float32 if anchor_dtype in LOW_PRECISION else anchor_dtype
    return option


def output_param(anchor: nn.Module) -> str | None:
    """Name of the anchor parameter whose dtype the point's tensors have.

    The *last* floating parameter: the module that produces a block's output is
    registered last (T5's ``DenseReluDense``: ``wi`` then ``wo``, whose dtype
    ``wo``'s output has when ``wo`` is kept in float32).
    """
    found = None
    for name, param in anchor.named_parameters():
        if param.is_floating_point():
            found = name
    return found


def place(module: nn.Module, anchors: tuple[nn.Module, ...], option: AdapterDtype,
          fallback: torch.Tensor | None) -> None:
    """Move ``module`` to its point's device and policy dtype; cast at its boundary if needed.

    ``anchors``: the backbone modules the point hooks, the one whose output it
    adapts first (no anchors: shared modules, placed like ``fallback``). Casts
    are added where the adapter's dtype differs from the output's, or where the
    hooked modules mix dtypes (their input may then differ from their output).
    """
    anchor = anchors[0] if anchors else None
    pname = output_param(anchor) if anchor is not None else None
    ref = anchor.get_parameter(pname) if pname is not None else fallback
    if ref is None:
        return
    dtype = resolve_dtype(option, ref.dtype)
    device = execution_device(anchors) if ref.is_meta else None
    module.to(device=device or ref.device, dtype=dtype)
    mixed = len({p.dtype for m in anchors for p in m.parameters() if p.is_floating_point()}) > 1
    if pname is not None and (dtype != ref.dtype or mixed):
        add_casts(module, anchor, pname, dtype)


def execution_device(anchors: tuple[nn.Module, ...]) -> torch.device | None:
    """Where offloaded modules run: the device an ``accelerate`` hook moves their weights to.

    Offloaded weights sit on the meta device between calls (``cpu_offload``,
    ``device_map`` with offload); the adapter must live where the weights run.
    """
    for anchor in anchors:
        hook = getattr(anchor, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


def add_casts(module: nn.Module, anchor: nn.Module, pname: str, dtype: torch.dtype) -> None:
    """Inputs to the module's own dtype, outputs to ``anchor.<pname>``'s dtype (read per call).

    ``dtype`` stands in for a module without parameters of its own (a generated
    adapter computes with its generator's weights, placed with the same policy).
    """
    module.register_forward_pre_hook(functools.partial(_to_own_dtype, dtype), with_kwargs=True)
    # partial over the backbone module (not a tensor): survives .to() and deepcopy of the model
    module.register_forward_hook(functools.partial(_to_anchor_dtype, anchor, pname))


def own_dtype(module: nn.Module) -> torch.dtype | None:
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors inside tuples/lists/dicts cast to ``dtype``; everything else as is."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        return tuple(cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: cast(v, dtype) for k, v in value.items()}
    return value


def _to_own_dtype(default: torch.dtype, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    dtype = own_dtype(module) or default
    return cast(args, dtype), cast(kwargs, dtype)


def _to_anchor_dtype(anchor: nn.Module, pname: str, module: nn.Module, args: tuple, output: Any) -> Any:
    return cast(output, anchor.get_parameter(pname).dtype)
