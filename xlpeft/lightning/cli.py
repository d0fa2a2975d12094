"""The ``xlpeft`` command: LightningCLI (fit/validate/test/predict) plus ``demo``.

    xlpeft fit --config configs/mlm-language-adapters.yaml
    xlpeft demo
"""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

from xlpeft.lightning.base import AdapterModule


def cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build the LightningCLI (any xlpeft module and DataModule, by class path)."""
    return LightningCLI(
        AdapterModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        args=args, run=run, save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from xlpeft.lightning.demo import main as demo
        demo(argv[1:])
        return
    cli(argv)


if __name__ == "__main__":
    main()
