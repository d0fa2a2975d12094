"""``xlpeft evaluate``: the zero-shot transfer harness driven by a YAML config.

    xlpeft evaluate --config configs/transfer-eval.yaml
    xlpeft evaluate --config configs/transfer-eval.yaml --seeds [0,1,2] --out runs/eval

Every field of :class:`xlpeft.lightning.transfer.EvalConfig` is a key of the
config (or a ``--flag``); ``recipes`` is a list of
:class:`~xlpeft.lightning.transfer.Recipe` mappings. It writes ``transfer.json``,
``transfer.md`` and ``transfer.png`` (95 % CI error bars) to ``out`` and prints the table.
"""

from __future__ import annotations

import warnings
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from xlpeft.lightning.transfer import EvalConfig, run

__all__ = ["main", "parser"]


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="xlpeft evaluate", description=__doc__.split("\n\n")[0],
                       default_env=False, exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with EvalConfig's fields")
    p.add_class_arguments(EvalConfig)
    return p


def config_from(argv: list[str] | None) -> EvalConfig:
    """The EvalConfig of a command line (config file first, flags after it override)."""
    p = parser()
    ns = p.parse_args(argv)
    with warnings.catch_warnings():  # jsonargparse renames instantiate_classes in v5
        warnings.simplefilter("ignore")
        init: Any = p.instantiate_classes(ns)
    return EvalConfig(**{k: v for k, v in vars(init).items() if k != "config"})


def main(argv: list[str] | None = None) -> dict:
    return run(config_from(argv))
