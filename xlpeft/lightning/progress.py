"""Progress a user sees in a terminal *and* in a log file, and a run paced to its data.

* ``LineProgress``: when stdout is not a terminal (``xlpeft fit … > run.log``) a
  progress bar writes nothing useful, so this prints one line per stage (its
  step count) and then a line every ~5 % or ``every_s`` seconds with the step,
  the loss and an ETA.
* ``StepsRichProgressBar`` / ``StepsTQDMProgressBar``: Lightning's bars, whose
  epoch label read ``Epoch 0/-2`` under ``max_steps`` (``max_epochs=-1``).
* ``ValidationReport``: prints each validation's metrics (``fit`` and
  ``validate``); otherwise they only reach the logger's files.
* ``FitToData``: a fixed ``val_check_interval`` larger than an epoch of the
  user's own (small) text made Lightning raise; it becomes one epoch, with a note.

``progress_callbacks()`` picks them for the current stdout.
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

__all__ = ["FitToData", "LineProgress", "StepsRichProgressBar", "StepsTQDMProgressBar",
           "ValidationReport", "format_duration", "progress_callbacks"]


def format_duration(seconds: float) -> str:
    """``75`` → ``1m15s``; ``3725`` → ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _total_steps(trainer: L.Trainer) -> int | None:
    """Optimizer steps this ``fit`` will take, ``None`` when unbounded."""
    total = trainer.estimated_stepping_batches
    return int(total) if math.isfinite(total) else None


def _epoch_label(trainer: L.Trainer) -> str:
    label = f"Epoch {trainer.current_epoch}"
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        label += f"/{trainer.max_epochs - 1}"
    return label


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def format_metrics(metrics: dict[str, Any], limit: int = 12) -> str:
    """``val/loss=3.2101 val/acc=0.1234`` (sorted; at most ``limit`` entries)."""
    items = sorted(_scalars(metrics).items())
    text = " ".join(f"{k}={v:.4g}" for k, v in items[:limit])
    return text + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


class LineProgress(ProgressBar):
    """One line per stage and every ~5 % / ``every_s`` seconds, with step, loss and ETA."""

    def __init__(self, every_s: float = 60.0, stream: IO[str] | None = None) -> None:
        super().__init__()
        self.every_s = every_s
        self.stream = stream
        self._enabled = True
        self._start = self._last = 0.0
        self._next_pct = 5
        self._total: int | None = None
        self._first_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, file=self.stream or sys.stdout, flush=True, **kwargs)

    def _line(self, text: str) -> None:
        self.print(f"[xlpeft] {text}")

    # ------------------------------------------------------------------ fit
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total = _total_steps(trainer)
        self._first_step = trainer.global_step
        self._start = self._last = time.monotonic()
        self._next_pct = 5
        per_epoch = trainer.num_training_batches
        total = "unbounded" if self._total is None else f"{self._total} steps"
        self._line(f"fit: {total} ({per_epoch} batches per epoch)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step, now = trainer.global_step, time.monotonic()
        done = step - self._first_step
        pct = 100 * step / self._total if self._total else 0.0
        due = now - self._last >= self.every_s or (self._total and pct >= self._next_pct) or done == 1
        if not due:
            return
        self._last = now
        while self._total and self._next_pct <= pct:
            self._next_pct += 5
        per_step = (now - self._start) / max(1, done)
        loss = _scalars({k: v for k, v in trainer.progress_bar_metrics.items() if "loss" in k})
        text = f"fit step {step}" + (f"/{self._total} ({pct:.0f}%)" if self._total else "")
        text += f", {_epoch_label(trainer).lower()}"
        if loss:
            text += ", " + format_metrics(loss, limit=3)
        text += f", {per_step:.2f} s/step, elapsed {format_duration(now - self._start)}"
        if self._total:
            text += f", ETA {format_duration(per_step * max(0, self._total - step))}"
        self._line(text)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._line(f"fit done: {trainer.global_step} steps in {format_duration(time.monotonic() - self._start)}")

    # ------------------------------------------------------------ evaluation
    def _eval_start(self, name: str, batches: Any) -> None:
        total = sum(batches) if isinstance(batches, list) else batches
        self._line(f"{name}: {total} batches")
        self._eval_started = time.monotonic()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._eval_start("validation", trainer.num_val_batches)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start("test", trainer.num_test_batches)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._line(f"test done in {format_duration(time.monotonic() - self._eval_started)}")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start("predict", trainer.num_predict_batches)


class StepsRichProgressBar(RichProgressBar):
    """Lightning's Rich bar, labelled ``Epoch 0`` rather than ``Epoch 0/-2`` under ``max_steps``."""

    def _get_train_description(self, current_epoch: int) -> str:
        label = _epoch_label(self.trainer)
        if len(self.validation_description) > len(label):
            label = f"{label:{len(self.validation_description)}}"
        return label


class StepsTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the same epoch label (tqdm fallback when Rich is missing)."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(_epoch_label(trainer))


class ValidationReport(L.Callback):
    """Prints the metrics of every validation run (not the sanity check), so ``fit`` shows them."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if not k.startswith("train")}
        if not metrics:
            return
        line = f"[xlpeft] validation at step {trainer.global_step}: {format_metrics(metrics)}"
        bar = trainer.progress_bar_callback
        if bar is not None and self.stream is None:
            bar.print(line)
        else:
            print(line, file=self.stream or sys.stdout, flush=True)


class FitToData(L.Callback):
    """Fit ``val_check_interval`` and ``log_every_n_steps`` to an epoch of small data.

    Lightning refuses an integer ``val_check_interval`` above the number of
    training batches; with one's own 700-line file that is a raw error after
    the model loaded. Here it becomes "validate every epoch", with a note.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.datamodule is None:
            return
        try:  # the DataModule is set up by now; a checkpoint's loader position is restored only later
            batches = len(trainer.datamodule.train_dataloader())
        except (TypeError, NotImplementedError, AttributeError):
            return  # an iterable without a length: nothing to fit
        interval = trainer.val_check_interval
        if (isinstance(interval, int) and not isinstance(interval, bool) and interval > batches
                and trainer.check_val_every_n_epoch is not None and batches > 0):
            if trainer.is_global_zero:
                print(f"[xlpeft] val_check_interval {interval} is more than the {batches} training batches "
                      f"of an epoch; validating once per epoch instead", flush=True)
            trainer.val_check_interval = batches
        if 0 < batches < trainer.log_every_n_steps:
            trainer.log_every_n_steps = batches


def progress_callbacks(stream: IO[str] | None = None) -> list[L.Callback]:
    """The progress bar for ``stream`` (default stdout): a bar on a terminal, lines otherwise."""
    out = stream or sys.stdout
    tty = bool(getattr(out, "isatty", lambda: False)())
    if tty:
        bar: ProgressBar = StepsRichProgressBar() if _RICH_AVAILABLE else StepsTQDMProgressBar()
    else:
        bar = LineProgress(stream=stream)
    return [bar, ValidationReport(stream=stream if not tty else None)]
