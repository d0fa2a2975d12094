"""Checkpoints that execute nothing, and the state an exact resume needs.

* ``read_checkpoint``: every checkpoint xlpeft reads goes through
  ``torch.load(weights_only=True)``, whatever the path (local, ``file://``,
  fsspec URLs such as ``memory://`` or ``s3://``, ``http(s)://``) and whatever
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says (an explicit ``weights_only=True``
  is not overridden). Lightning itself defaults to ``weights_only=False`` for
  ``http`` URLs, where a pickled payload in ``hyper_parameters`` would run.
* ``SafeCheckpointIO``: the Trainer plugin that does the same for
  ``Trainer.fit(ckpt_path=...)`` and the CLI's ``--ckpt_path``.
* ``primitive``: hyper-parameters are stored as plain values only, so the
  checkpoint always loads with ``weights_only=True``.
* ``capture_rng`` / ``restore_rng``: the global RNGs (dropout, anything drawn
  without a generator) as plain tensors and numbers.
"""

from __future__ import annotations

import io
import pickle
import random
import urllib.request
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from xlpeft.data._common import MissingFileError
from xlpeft.errors import CorruptFileError, XlpeftTypeError, XlpeftValueError

PLAIN = (type(None), bool, int, float, str)


def read_bytes(path: Any) -> bytes:
    """The raw bytes of a checkpoint at a path or URL."""
    if not isinstance(path, (str, Path)):
        raise XlpeftTypeError(f"a checkpoint path can be a str or pathlib.Path; got {type(path).__name__}")
    text = str(path)
    try:
        if text.startswith(("http://", "https://")):
            with urllib.request.urlopen(text, timeout=60) as response:  # noqa: S310 (scheme checked above)
                return response.read()
        import fsspec
        with fsspec.open(text, "rb") as handle:
            return handle.read()
    except FileNotFoundError as exc:
        raise MissingFileError(f"checkpoint {text} does not exist; check the path "
                               f"(relative paths start at {Path.cwd()})") from exc
    except IsADirectoryError as exc:
        raise XlpeftValueError(f"checkpoint {text} is a folder; give the .ckpt file") from exc
    except OSError as exc:  # URLError is an OSError
        raise MissingFileError(f"checkpoint {text} could not be read ({exc}); check the path or URL") from exc


def parse_checkpoint(data: bytes, where: str, map_location: Any = None) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of checkpoint bytes, with errors that name ``where``."""
    if not data:
        raise CorruptFileError(f"{where}: the checkpoint is empty (0 bytes); it was probably cut off while "
                               "being written. Use an earlier checkpoint")
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).strip().splitlines()
        reason = next((line for line in detail if "GLOBAL" in line or "Unsupported" in line), detail[0] if detail else "")
        raise CorruptFileError(
            f"{where}: the checkpoint holds objects other than tensors and plain values ({reason.strip()}); "
            "xlpeft loads checkpoints with weights_only=True and never runs pickled code. Re-save it from "
            "xlpeft (hyper-parameters are stored as plain values) or load only trusted files yourself") from exc
    except (EOFError, RuntimeError, ValueError) as exc:
        raise CorruptFileError(f"{where}: truncated or not a torch checkpoint ({type(exc).__name__}: "
                               f"{str(exc).strip()[:200]}); use an earlier or complete checkpoint") from exc
    if not isinstance(checkpoint, dict):
        raise CorruptFileError(f"{where}: a checkpoint can be a dict; got {type(checkpoint).__name__}")
    return checkpoint


def read_checkpoint(path: Any, map_location: Any = None) -> dict[str, Any]:
    """A checkpoint from a path or URL, loaded with ``weights_only=True``."""
    return parse_checkpoint(read_bytes(path), str(path), map_location)


def refuse_unsafe(weights_only: bool | None) -> None:
    if weights_only is False:
        raise XlpeftValueError("`weights_only` can be True or None for xlpeft checkpoints (they are always "
                               "loaded with weights_only=True); got False")


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose loads are always ``weights_only=True``, from any path or URL."""

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        refuse_unsafe(weights_only)
        return read_checkpoint(path, map_location)


def primitive(value: Any, name: str) -> Any:
    """``value`` as plain data (None, bool, int, float, str, tensors, lists, tuples, str-keyed dicts).

    Paths become strings and xlpeft configs their ``to_dict()``; anything else
    is refused here, at save time, rather than written as a pickle that a
    safe load later rejects.
    """
    if isinstance(value, PLAIN) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        items = [primitive(v, f"{name}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise XlpeftTypeError(f"hyper-parameter `{name}` keys can be strings; got {bad[0]!r}")
        # ``__class__`` and similar come from ``locals()`` in an __init__, never from an argument
        return {k: primitive(v, f"{name}.{k}") for k, v in value.items() if not k.startswith("__")}
    if is_dataclass(value) and hasattr(value, "to_dict"):
        return primitive(value.to_dict(), name)
    raise XlpeftTypeError(
        f"hyper-parameter `{name}` can be None, bool, int, float, str, a tensor, or a list/tuple/dict of these "
        f"(checkpoints load with weights_only=True); got {type(value).__name__}. Pass a plain value (e.g. a "
        "path or a config dict) or exclude it with save_hyperparameters(ignore=[...])")


def capture_rng() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, Python, NumPy) as tensors and numbers."""
    version, words, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "python": {"version": version, "words": _words(words), "gauss": gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": str(kind), "keys": _words(keys), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global RNGs to a ``capture_rng`` state (the parts present)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(_unwords(py["words"])), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        n = state["numpy"]
        keys = np.asarray(_unwords(n["keys"]), dtype=np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))


def _words(values: Any) -> torch.Tensor:
    """32-bit unsigned words (Mersenne Twister state) as an int32 tensor, 4 bytes each."""
    return torch.tensor([int(v) - (1 << 32) if int(v) >= 1 << 31 else int(v) for v in values], dtype=torch.int32)


def _unwords(words: torch.Tensor) -> list[int]:
    return [w & 0xFFFFFFFF for w in words.tolist()]
