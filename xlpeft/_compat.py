"""Compatibility shims for third-party packages.

lang2vec 1.1.2 does ``import pkg_resources`` at import time, and that module
was removed from setuptools 81. lang2vec only calls
``pkg_resources.resource_filename(module_name, relative_path)``, so when the
real module cannot be imported we install a tiny stand-in that provides just
that function. The real module is always preferred when it exists.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
import warnings

SHIM_MARKER = "_xlpeft_pkg_resources_shim"


def resource_filename(package_or_module: str, resource_name: str) -> str:
    """Path of ``resource_name`` next to a package or module, like pkg_resources does.

    A package resolves to its own directory, a plain module to the directory
    holding it (lang2vec passes its module name ``lang2vec.lang2vec``).
    """
    module = importlib.import_module(package_or_module)
    paths = getattr(module, "__path__", None)
    base = list(paths)[0] if paths else os.path.dirname(module.__file__ or "")
    return os.path.join(base, *resource_name.split("/"))


def _make_shim() -> types.ModuleType:
    shim = types.ModuleType("pkg_resources", "xlpeft stand-in: only resource_filename.")
    shim.resource_filename = resource_filename  # type: ignore[attr-defined]
    setattr(shim, SHIM_MARKER, True)
    return shim


def ensure_pkg_resources() -> bool:
    """Make ``import pkg_resources`` work; return True when the shim was installed.

    The real module is imported first (its deprecation warning silenced); only
    if that fails is the stand-in placed in ``sys.modules``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pkg_resources  # noqa: F401
    except ImportError:
        sys.modules["pkg_resources"] = _make_shim()
        return True
    return bool(getattr(sys.modules.get("pkg_resources"), SHIM_MARKER, False))


def unshadow_package(name: str) -> None:
    """Let ``import name`` find the package when a same-named *script* shadows it.

    lang2vec installs a ``lang2vec.py`` script into the virtualenv's ``bin/``, and a
    console script such as ``xlpeft`` runs with ``bin/`` first on ``sys.path``, so
    ``import lang2vec.lang2vec`` found the script (``'lang2vec' is not a package``
    or a missing ``bin/data/letter_codes.json``). Drop that folder from ``sys.path``
    (and a cached non-package module) when it shadows an installed package.
    """
    import importlib.machinery
    import importlib.util

    cached = sys.modules.get(name)
    if cached is not None and not hasattr(cached, "__path__"):
        del sys.modules[name]
    spec = importlib.util.find_spec(name)
    while spec is not None and spec.submodule_search_locations is None and spec.origin:
        folder = os.path.dirname(os.path.abspath(spec.origin))
        rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != folder]
        package = importlib.machinery.PathFinder.find_spec(name, rest)
        if package is None or package.submodule_search_locations is None:
            return  # no package behind it: leave sys.path alone
        sys.path[:] = rest
        spec = importlib.util.find_spec(name)


def import_lang2vec() -> types.ModuleType:
    """Import ``lang2vec.lang2vec`` with the pkg_resources shim in place if needed."""
    from xlpeft.errors import MissingDependencyError

    ensure_pkg_resources()
    unshadow_package("lang2vec")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("lang2vec.lang2vec")
    except ImportError as exc:
        raise MissingDependencyError(
            f"typology vectors need lang2vec ({exc}); install it with `pip install lang2vec==1.1.2`"
        ) from exc
