"""Sharded (FSDP) models: detect sharding, gather full weights for export or merging.

Under FSDP a rank holds a shard of each parameter: FSDP1 (Lightning's
``FSDPStrategy``) keeps flat parameters and original-parameter views of the
local shard; FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``)
turns parameters into ``DTensor``s. Writing an adapter file or merging an
adapter into a linear weight needs the full tensors:

    full_weights(model)                 every rank (a collective), then read on rank 0
    full_weights(model, writeback=True) in-place edits reach the shards (merge)
    (FSDP1 only: FSDP2 models are detected and refused with what to do)

Plain (unsharded) models pass through unchanged, so callers need no branch.
``is_sharded`` is ``xlpeft.core.sharding.is_sharded`` (the check ``merge`` makes):
inside ``full_weights`` the weights are full and it is False.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from xlpeft.core.sharding import is_sharded, sharded_message
from xlpeft.errors import XlpeftValueError

__all__ = ["check_full_weights", "full_weights", "is_sharded"]


def _fsdp1_roots(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return [m for m in module.modules() if isinstance(m, FSDP) and m.check_is_root()] \
        if any(isinstance(m, FSDP) for m in module.modules()) else []


def _fsdp2_modules(module: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def check_full_weights(module: nn.Module, operation: str) -> None:
    """Refuse ``operation`` (e.g. ``merge``) on sharded weights, before anything changes."""
    if is_sharded(module):
        raise XlpeftValueError(sharded_message(operation))


@contextlib.contextmanager
def full_weights(module: nn.Module, writeback: bool = False) -> Iterator[None]:
    """Full (unsharded) parameters inside the block, on every rank; a no-op for plain models.

    Every rank must enter it (it all-gathers). ``writeback=True`` keeps in-place
    edits made inside. FSDP1 only: FSDP2 (``fully_shard``) models are refused
    (their ``unshard()`` left adapter parameters unreadable here, torch 2.13).
    """
    if _fsdp2_modules(module):
        raise XlpeftValueError(
            "full_weights can gather FSDP1 (Lightning FSDPStrategy) models; got an FSDP2 (fully_shard) "
            "model. Gather its adapters with torch.distributed.checkpoint.state_dict.get_model_state_dict("
            "..., options=StateDictOptions(full_state_dict=True)) or use FSDPStrategy")
    roots = _fsdp1_roots(module)
    if not roots:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with contextlib.ExitStack() as stack:
        for root in roots:
            stack.enter_context(FSDP.summon_full_params(root, writeback=writeback, with_grads=False))
        yield
