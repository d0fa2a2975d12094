"""Shared plumbing of xlpeft's LightningModules.

* the backbone is loaded by name or path (``"embedded"`` = the converted
  multilingual-e5-small) and wrapped in an ``AdaptedModel``;
* checkpoints hold only what trains (adapters, heads, unfrozen backbone
  parameters) plus optimizer/scheduler state, and refuse another backbone;
* checkpoints execute nothing: every load is ``weights_only=True`` (our
  ``load_from_checkpoint``, and ``SafeCheckpointIO`` installed on the Trainer
  for ``fit(ckpt_path=...)``), hyper-parameters are stored as plain values;
* a resume is the run it resumes: the global RNGs are saved and restored
  right before the first resumed batch (the data order and masks are the
  DataModule's part, see ``xlpeft.data.resume``);
* a failed state load changes nothing; a NaN/inf loss stops training;
* AdamW with linear warm-up and decay, stepped per optimizer step.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from xlpeft.backbones.embedded import backbone_path
from xlpeft.core.model import AdaptedModel
from xlpeft.errors import IncompatibleAdapterError, XlpeftValueError
from xlpeft.lightning.checkpoint_io import (SafeCheckpointIO, capture_rng, parse_checkpoint, primitive,
                                            read_bytes, refuse_unsafe, restore_rng)
from xlpeft.lightning.guard import LossGuard

class AdapterModule(L.LightningModule):
    """Base LightningModule: an ``AdaptedModel`` plus adapter-only checkpoints."""

    def __init__(self, backbone: str = "embedded", head: str = "base", lr: float = 1e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 0, *,
                 adapted: AdaptedModel | None = None) -> None:
        """``adapted``: an already built model (e.g. a warm-started seq2seq) instead of loading ``backbone``."""
        super().__init__()
        self.adapted = adapted if adapted is not None else \
            AdaptedModel.from_pretrained(backbone_path(backbone), head=head)
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.adapted.train()  # from_pretrained returns eval mode; Lightning keeps modes as found
        self._rng_to_restore: dict[str, Any] | None = None
        self._loss_guard = LossGuard()

    # ------------------------------------------------------------- safe loading
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, weights_only: bool | None = None, **kwargs: Any):
        """Lightning's ``load_from_checkpoint``, always ``weights_only=True`` (local paths and URLs alike)."""
        refuse_unsafe(weights_only)
        data = read_bytes(checkpoint_path)
        parse_checkpoint(data, str(checkpoint_path))  # project errors for empty, truncated or unsafe files
        return super().load_from_checkpoint(io.BytesIO(data), map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, weights_only=True, **kwargs)

    def configure_model(self) -> None:
        """Make the Trainer read checkpoints with ``SafeCheckpointIO`` (runs before ``ckpt_path`` is loaded).

        Only Lightning's default ``TorchCheckpointIO`` is replaced; a plugin the
        user chose is kept. Subclasses that override this hook call ``super()``.
        """
        if self._trainer is None:  # load_from_checkpoint calls this hook too; it reads safely itself
            return
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = SafeCheckpointIO()

    def setup(self, stage: str) -> None:
        """Refuse a DataModule whose tokenizer does not fit this model's embeddings (before any step)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            check_data_tokenizer(self, datamodule)

    # ------------------------------------------------------------- loss guard and exact resume
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # the first resumed batch: RNGs as they were at the save
            restore_rng(self._rng_to_restore)
            self._rng_to_restore = None
        self._loss_guard.start(batch, self.trainer.global_step, self.trainer.current_epoch, batch_idx)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._loss_guard.check(loss, every=self.trainer.log_every_n_steps)

    def on_train_epoch_end(self) -> None:
        self._loss_guard.flush()

    def on_train_end(self) -> None:
        self._loss_guard.flush()

    def require_ddp_find_unused(self, routed: bool) -> None:
        """Refuse DDP without ``find_unused_parameters`` when training is routed.

        A rank whose batch holds no example of a language leaves that adapter
        without gradient; DDP's all-reduce then waits forever for it.
        """
        strategy = self.trainer.strategy
        if (routed and isinstance(strategy, DDPStrategy)
                and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)):
            raise XlpeftValueError(
                "routed training of several language modules under DDP needs find_unused_parameters=True "
                "(a rank whose batch lacks a language gives its module no gradient and DDP hangs); "
                "use strategy='ddp_find_unused_parameters_true' or DDPStrategy(find_unused_parameters=True)")

    # ------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise XlpeftValueError("nothing to train: no parameter requires grad; check train_adapters")
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1
        warm = self.warmup_steps

        def factor(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            return max(0.0, (total - step) / max(1, total - warm))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------- checkpoints
    def trainable_keys(self) -> set[str]:
        """State-dict keys a checkpoint keeps: everything not frozen backbone.

        Matched by tensor identity, not name: a tied decoder weight
        (``cls.predictions.decoder.weight`` = the input embeddings) and a
        backbone module also registered here (``self.head``) appear under
        other names than ``named_parameters`` gives.
        """
        frozen = {id(p) for p in self.adapted.model.parameters() if not p.requires_grad}
        frozen |= {id(b) for b in self.adapted.model.buffers()}
        return {k for k, v in self.state_dict(keep_vars=True).items() if id(v) not in frozen}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._loss_guard.flush()  # never write a checkpoint of NaN weights without saying so
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = primitive(dict(checkpoint[key]), key)
        checkpoint["xlpeft"] = {
            "backbone": self.adapted.backbone_info(),
            "adapters": {n: c.to_dict() for n, c in self.adapted.configs.items()},
            "rng": _rng_of_every_rank(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("xlpeft", {}).get("rng")
        if self._trainer is not None and self.trainer.state.fn == "fit" and states:
            self._rng_to_restore = states[self.global_rank % len(states)]
        saved = checkpoint.get("xlpeft", {}).get("backbone")
        if saved is not None and saved != self.adapted.backbone_info():
            here = self.adapted.backbone_info()
            diffs = [f"{k}: checkpoint {saved.get(k)!r} vs model {here[k]!r}"
                     for k in here if saved.get(k) != here[k]]
            raise IncompatibleAdapterError(
                f"checkpoint was made with another backbone ({'; '.join(diffs)}); "
                "use the backbone it was trained with"
            )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Adapter-only checkpoints: the frozen backbone is absent by design."""
        own = self.state_dict(keep_vars=True)
        unexpected = sorted(set(state_dict) - set(own))
        # Frozen adapters may come from their own directories (e.g. candidates a callback
        # loads for test-time adaptation); only what trains must be in the checkpoint.
        needed = {k for k in self.trainable_keys() if getattr(own[k], "requires_grad", False)}
        missing = sorted(needed - set(state_dict))
        if strict and (unexpected or missing):
            raise XlpeftValueError(
                f"checkpoint does not match this module: unexpected {unexpected[:5]}, "
                f"missing {missing[:5]}; was it saved with other adapters or languages?"
            )
        _check_shapes(state_dict, own)
        backup = {k: own[k].detach().clone() for k in state_dict if isinstance(own.get(k), torch.Tensor)}
        try:
            return super().load_state_dict(state_dict, strict=False, assign=assign)
        except Exception:
            with torch.no_grad():  # leave the module exactly as it was
                current = self.state_dict(keep_vars=True)
                for k, v in backup.items():
                    current[k].copy_(v)
            raise

    # ------------------------------------------------------------- export
    def export_adapters(self, directory: str | Path, names: list[str] | None = None) -> list[Path]:
        """Write each adapter as an adapter directory (atomic), rank zero only."""
        out = []
        if getattr(self, "_trainer", None) is not None and not self.trainer.is_global_zero:
            return out
        for name in names or self.adapted.adapter_names:
            path = Path(directory) / name
            self.adapted.save_adapter(name, str(path))
            out.append(path)
        return out


def check_data_tokenizer(module: AdapterModule, datamodule: Any) -> None:
    """A clear error where the data's token ids cannot (or should not) index the model's embeddings.

    Without it, a tokenizer larger than the embedding matrix fails deep inside the
    embeddings with a bare ``IndexError``, and one of another backbone trains silently
    on the wrong token ids.
    """
    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is None:
        return
    rows = module.adapted.model.get_input_embeddings().num_embeddings
    size = len(tokenizer)
    data_backbone = getattr(datamodule, "hparams", {}).get("backbone")
    model_backbone = module.hparams.get("backbone")
    differ = data_backbone is not None and model_backbone is not None and str(data_backbone) != str(model_backbone)
    if size > rows or (differ and size != rows):
        raise XlpeftValueError(
            f"the data's tokenizer ({data_backbone or 'given'}: {size} tokens) does not match the model's "
            f"embeddings ({model_backbone}: {rows} rows); give the DataModule the model's backbone "
            "(`backbone=` the same folder or name; under `xlpeft fit` leave `data.init_args.backbone` out "
            "and it follows the model)")


def _rng_of_every_rank() -> list[dict[str, Any]]:
    """Each rank's global RNG states (ranks draw different dropout masks), gathered for rank 0 to save.

    Lightning builds a checkpoint on every rank (only rank 0 writes it), so
    the collective is reached by all ranks together.
    """
    state = capture_rng()
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def _check_shapes(state_dict: Mapping[str, Any], own: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose tensors differ in shape or dtype from the module's, before copying any."""
    bad = [(k, v, own[k]) for k, v in state_dict.items()
           if k in own and isinstance(v, torch.Tensor) and isinstance(own[k], torch.Tensor)
           and (v.shape != own[k].shape or v.dtype != own[k].dtype)]
    if bad:
        key, got, want = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise IncompatibleAdapterError(
            f"checkpoint tensor {key!r} can be {tuple(want.shape)} {want.dtype} (this module's); got "
            f"{tuple(got.shape)} {got.dtype}{more}. Nothing was loaded; build the module with the adapter "
            "configs and backbone the checkpoint was trained with")


def mean_pool(hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Mean of token states over real (non-pad) tokens."""
    weights = attention.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def find_head(model: nn.Module, candidates: tuple[str, ...] = ("cls", "lm_head")) -> nn.Module:
    """The MLM head module of a masked-LM model (its family's attribute)."""
    for name in candidates:
        if hasattr(model, name):
            return getattr(model, name)
    raise XlpeftValueError(
        f"{type(model).__name__} has no MLM head ({', '.join(candidates)}); load it with head='masked-lm'"
    )


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
