"""A console script's folder first on ``sys.path`` must not shadow the lang2vec package.

lang2vec installs ``bin/lang2vec.py``; the ``xlpeft`` console script runs with
``bin/`` as ``sys.path[0]``, and ``xlpeft demo`` crashed in its typology
average with ``FileNotFoundError: …/bin/data/letter_codes.json``.
"""

from __future__ import annotations

import sys

from xlpeft._compat import import_lang2vec


def test_a_lang2vec_script_first_on_sys_path_does_not_shadow_the_package(tmp_path, monkeypatch):
    (tmp_path / "lang2vec.py").write_text("raise FileNotFoundError('bin/data/letter_codes.json')\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    for name in [m for m in sys.modules if m == "lang2vec" or m.startswith("lang2vec.")]:
        monkeypatch.delitem(sys.modules, name)
    module = import_lang2vec()
    assert "site-packages" in module.__file__ and module.__file__.endswith("lang2vec/lang2vec.py")
    assert str(tmp_path) not in sys.path
    assert callable(module.get_features)
