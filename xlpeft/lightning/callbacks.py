"""Callbacks: export trained adapters as adapter directories."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class AdapterExport(L.Callback):
    """At the end of ``fit``, write each trained adapter to ``dirpath/<name>`` (rank zero)."""

    def __init__(self, dirpath: str = "adapters", names: list[str] | None = None) -> None:
        self.dirpath = dirpath
        self.names = names

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and hasattr(pl_module, "export_adapters"):
            written = pl_module.export_adapters(Path(self.dirpath), self.names)
            for path in written:
                print(f"[xlpeft] adapter written to {path}")
