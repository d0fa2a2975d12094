"""Callbacks: export trained adapters as adapter directories."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from xlpeft.lightning.sharded import full_weights


class AdapterExport(L.Callback):
    """At the end of ``fit``, write each trained adapter to ``dirpath/<name>`` (rank zero).

    Args:
        dirpath: Folder the adapters are written to, one sub-folder per adapter. Under
            `xlpeft fit` an adapter an earlier run wrote there is not replaced unless `--overwrite`.
        names: Adapters to write (default: every adapter of the model).
    """

    def __init__(self, dirpath: str = "adapters", names: list[str] | None = None) -> None:
        self.dirpath = dirpath
        self.names = names

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "export_adapters"):
            return
        # every rank gathers sharded (FSDP) weights; rank zero writes full tensors
        with full_weights(trainer.model if trainer.model is not None else pl_module):
            if trainer.is_global_zero:
                written = pl_module.export_adapters(Path(self.dirpath), self.names)
                for path in written:
                    print(f"[xlpeft] adapter written to {path}")
