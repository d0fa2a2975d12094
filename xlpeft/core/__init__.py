"""The engine: named adapters at backbone points, composed and routed (plain PyTorch).

Layer 3 of DESIGN.md. Everything outside ``core/`` uses only the public names
of ``AdaptedModel`` and of the modules here; ``core`` never imports ``ops``
at module level (``AdaptedModel.save_adapter`` and friends delegate lazily).
"""

from xlpeft.core.composition import Average, BatchSplit, Fuse, Parallel, Setup, Stack
from xlpeft.core.model import AdaptedModel

__all__ = ["AdaptedModel", "Average", "BatchSplit", "Fuse", "Parallel", "Setup", "Stack"]
