"""Whether a model's weights are FSDP shards right now (torch only; no Lightning).

Merging writes into backbone weights and unmerging copies full tensors back, so
both need the full weights. Under FSDP a rank holds shards:

* FSDP2 (``fully_shard``): parameters are ``DTensor``s;
* FSDP1 with ``use_orig_params=False``: the module holds a ``FlatParameter``
  (``_flat_param``) and its linears plain-tensor views;
* FSDP1 with ``use_orig_params=True``: the original parameters stay, as 1-D
  views of the local shard (a linear's weight is then not 2-D);
* a module wrapped by FSDP1 anywhere inside.

Inside ``FullyShardedDataParallel.summon_full_params`` (what
``xlpeft.lightning.sharded.full_weights`` enters) the FSDP1 modules are in the
``SUMMON_FULL_PARAMS`` state, flat parameters are swapped for full views, and
the check passes. A NO_SHARD root outside the model (one process) holds full
views, which is full weights too.
"""

from __future__ import annotations

import torch
from torch import nn


def _fsdp1_idle(module: nn.Module) -> bool:
    """Some FSDP1 module inside ``module`` is not summoned (its weights are shards)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # torch without distributed
        return False
    return any(isinstance(m, FSDP) and getattr(m.training_state, "name", "") != "SUMMON_FULL_PARAMS"
               for m in module.modules())


def _fsdp2(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules()) or \
        any(isinstance(p, DTensor) for p in module.parameters())


def _shard_view(module: nn.Module) -> bool:
    """An FSDP1 original parameter flattened to its shard: a linear/embedding weight that is not 2-D."""
    return any(isinstance(m, (nn.Linear, nn.Embedding)) and getattr(m.weight, "_fsdp_flattened", False)
               and m.weight.dim() != 2 for m in module.modules())


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module``'s weights are FSDP shards here (DTensor, flat parameters, shard views)."""
    if not torch.distributed.is_available():  # a build without torch.distributed has no FSDP
        return False
    return bool(_fsdp2(module) or _fsdp1_idle(module) or _shard_view(module)
                or any(getattr(p, "_is_flat_param", False) for p in module.parameters()))


def sharded_message(operation: str) -> str:
    """What to do instead of ``operation`` on shards (one wording for core and Lightning)."""
    return (f"`{operation}` needs full weights, but this model's parameters are FSDP shards (DTensor or "
            "flat parameters); call it inside `xlpeft.lightning.sharded.full_weights(model, "
            "writeback=True)` on every rank (FSDP1), or after gathering the full weights (FSDP2: "
            "get_model_state_dict(..., options=StateDictOptions(full_state_dict=True)) into an "
            "unsharded model)")
