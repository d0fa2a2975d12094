"""xlpeft: parameter-efficient multilingual adaptation, with Lightning plumbing.

The core (``AdaptedModel``, methods, composition, routing, adapter files) is
plain PyTorch; ``xlpeft.lightning`` adds LightningModules, callbacks and the CLI.

The top-level names are imported on first use (PEP 562), so ``import xlpeft``
does not start torch: the ``xlpeft`` command sets its OpenMP defaults first.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xlpeft.core.composition import Average, BatchSplit, Fuse, Parallel, Stack
    from xlpeft.core.model import AdaptedModel
    from xlpeft.errors import XlpeftError
    from xlpeft.ops.hub import push_adapter_to_hub
    from xlpeft.ops.sparsify import sparsify

__version__ = "0.1.0"
_WHERE = {"AdaptedModel": "xlpeft.core.model", "Average": "xlpeft.core.composition",
          "BatchSplit": "xlpeft.core.composition", "Fuse": "xlpeft.core.composition",
          "Parallel": "xlpeft.core.composition",
          "Stack": "xlpeft.core.composition", "XlpeftError": "xlpeft.errors",
          "sparsify": "xlpeft.ops.sparsify", "push_adapter_to_hub": "xlpeft.ops.hub"}
__all__ = ["AdaptedModel", "Average", "BatchSplit", "Fuse", "Parallel", "Stack", "XlpeftError", "__version__",
           "push_adapter_to_hub", "sparsify"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'xlpeft' has no attribute {name!r}")


def __dir__() -> list[str]:
    modules = {k for k, v in globals().items() if isinstance(v, ModuleType) and k != "importlib"}
    return sorted(set(__all__) | modules)
