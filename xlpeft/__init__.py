"""xlpeft: parameter-efficient multilingual adaptation, with Lightning plumbing.

The core (``AdaptedModel``, methods, composition, routing, adapter files) is
plain PyTorch; ``xlpeft.lightning`` adds LightningModules, callbacks and the CLI.
"""

from xlpeft.core.composition import Average, BatchSplit, Fuse, Stack
from xlpeft.errors import XlpeftError
from xlpeft.core.model import AdaptedModel
from xlpeft.ops.sparsify import sparsify

__version__ = "0.1.0"
__all__ = ["AdaptedModel", "Average", "BatchSplit", "Fuse", "Stack", "XlpeftError", "__version__", "sparsify"]
