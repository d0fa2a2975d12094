"""``xlpeft calibrate``: train the embedded backbone's MLM head once and keep it where ``"embedded"`` looks.

multilingual-e5-small ships no MLM head; the converter initialises one
(identity transform, zero bias), so MLM losses and predictions on the raw
backbone mean little. Calibration trains only the head (transform + output
bias; the decoder stays tied to the frozen embeddings) by masked LM on the
embedded corpora and writes a complete HF folder to
``calibrated_path()`` (``<cache>/backbones/multilingual-e5-small-calibrated``),
with provenance; from then on ``"embedded"`` resolves to it.

    xlpeft calibrate                       # 150 steps on eng, spa, deu, fra, swh, tgl
    xlpeft fit --config configs/calibrate-head.yaml   # the same through LightningCLI
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L

from xlpeft.backbones.embedded import EMBEDDED_BASE, SOURCE_FILE, backbone_path, calibrated_path, \
    calibration_record
from xlpeft.errors import XlpeftValueError

__all__ = ["CalibratedBackboneExport", "main"]

LANGUAGES = ("eng", "spa", "deu", "fra", "swh", "tgl")


class CalibratedBackboneExport(L.Callback):
    """At the end of ``fit``, write the whole backbone (calibrated head included) as an HF folder.

    Args:
        dirpath: Destination folder; empty = where "embedded" looks
            (<cache>/backbones/multilingual-e5-small-calibrated). Replaced atomically.
    """

    def __init__(self, dirpath: str = "") -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from xlpeft.ops.files import MODEL, atomic_directory

        target = Path(self.dirpath) if self.dirpath else calibrated_path()
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) or pl_module.adapted.tokenizer
        base = getattr(pl_module, "hparams", {}).get("backbone", EMBEDDED_BASE)  # provenance of the start
        record = calibration_record(Path(backbone_path(base)), steps=trainer.global_step,
                                    languages=list(getattr(pl_module, "languages", [])))

        def write(tmp: Path) -> None:
            pl_module.adapted.model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

        atomic_directory(target, write, kind=MODEL)  # replaces only a model folder xlpeft wrote
        print(f"[xlpeft] calibrated backbone written to {target}; \"embedded\" now resolves to it", flush=True)


def calibrate(steps: int = 150, languages: tuple[str, ...] = LANGUAGES, batch_size: int = 16,
              max_length: int = 64, lines: int = 2000, lr: float = 1e-3, out: str = "",
              seed: int = 0) -> Path:
    """Calibrate the head of the embedded backbone; returns the folder written."""
    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning.mlm import MaskedLMAdaptation
    from xlpeft.lightning.progress import progress_callbacks

    if steps < 1:
        raise XlpeftValueError(f"`--steps` can be an int >= 1; got {steps}")
    L.seed_everything(seed, verbose=False)
    module = MaskedLMAdaptation(EMBEDDED_BASE, languages=languages, train="head", lr=lr, warmup_steps=10)
    data = MLMDataModule(languages, backbone=EMBEDDED_BASE, batch_size=batch_size, max_length=max_length,
                         max_train_lines=lines, temperature=1.0, seed=seed)
    export = CalibratedBackboneExport(out)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_model_summary=False, callbacks=[export, *progress_callbacks()])
    trainer.fit(module, data)
    return Path(out) if out else calibrated_path()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xlpeft calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    parser.add_argument("--languages", nargs="+", default=list(LANGUAGES),
                        help="embedded corpora to calibrate on (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lines", type=int, default=2000, help="training lines per language")
    parser.add_argument("--out", default="", help="destination (default: where \"embedded\" looks)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    calibrate(args.steps, tuple(args.languages), args.batch_size, lines=args.lines, out=args.out,
              seed=args.seed)
