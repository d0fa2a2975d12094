"""Offline merged export: the backbone with its merged adapters as a plain HF model.

    model.merge("swh"); model.merge("genre")          # or model.merge_and_unload()
    save_merged(model, "out/swh-genre")               # config.json + model.safetensors (+ tokenizer)
    AutoModel.from_pretrained("out/swh-genre")        # same outputs, no xlpeft needed

Only what a plain model can hold is exported: every adapter of the active setup
must be merged (an unmerged one would be silently lost), and no merged BitFit
may have given a bias-free linear a bias (a T5 ``q`` has no place for one). The
folder is written aside and swapped in atomically (``ops.artefacts``); an
existing destination is replaced only if it is a model folder xlpeft wrote.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from xlpeft.core.composition import leaves
from xlpeft.errors import XlpeftValueError
from xlpeft.ops.files import MODEL, atomic_directory

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel


def check_exportable(model: AdaptedModel) -> None:
    """Refuse an export whose outputs would differ from the model's."""
    unmerged = [n for n in leaves(model.active) if not model.is_merged(n)]
    if unmerged:
        raise XlpeftValueError(
            f"save_merged can export merged adapters only; got unmerged {unmerged} in the active setup "
            f"{model.active!r}, which a plain model would drop. merge() them (in the setup's order) "
            "or set_active(None) to export the backbone with just its merged adapters"
        )
    added = model.added_biases()
    if added:
        raise XlpeftValueError(
            f"save_merged can export linears as the backbone class defines them; got merged BitFit "
            f"biases on bias-free linears {added[:4]}{' …' if len(added) > 4 else ''}, which a plain "
            f"{type(model.model).__name__} cannot hold. Save the adapter itself with save_adapter"
        )


def save_merged(model: AdaptedModel, path: str | os.PathLike, tokenizer: bool = True) -> Path:
    """Write ``model.model`` (merged weights included) with ``save_pretrained``, atomically.

    ``tokenizer``: also save ``model.tokenizer`` when there is one.
    """
    check_exportable(model)

    def write(tmp: Path) -> None:
        model.model.save_pretrained(tmp)
        if tokenizer and model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)

    return atomic_directory(path, write, kind=MODEL)
