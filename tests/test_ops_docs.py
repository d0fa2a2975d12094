"""``xlpeft.ops``'s docstring names every module of the package, one line each."""

from __future__ import annotations

from pathlib import Path

import xlpeft.ops


def test_the_ops_docstring_lists_every_module_once():
    modules = sorted(p.stem for p in Path(xlpeft.ops.__file__).parent.glob("*.py") if p.stem != "__init__")
    lines = [line for line in xlpeft.ops.__doc__.splitlines() if line.startswith("* ``")]
    listed = sorted(line.split("``")[1] for line in lines)
    assert listed == modules
    assert all(len(line.split(":", 1)[1].strip()) > 10 for line in lines)  # each says what it is for
