"""LaSS for multilingual NMT: per-direction sub-networks of the shared model, searched, trained, applied.

Lin, Wu, Wang & Li 2021, "Learning Language Specific Sub-network for
Multilingual Machine Translation" (ACL, arXiv:2105.09259). Masks and their
format: ``xlpeft.methods.lass``.

    fit start   masks given (``masks``) or searched: per direction, fine-tune the
                targeted weights on that direction's rows of the training data,
                keep the top (1 − prune) entries of each weight, restore θ
    each step   the batch is grouped by direction; each group runs with W ⊙ M_d
                (``torch.func.functional_call``: gradient reaches W inside M_d only);
                after the optimizer step every entry outside the union of the
                step's masks is put back bit-identical (AdamW's momentum and decay
                would move it otherwise)
    generate    per direction group under its mask, outputs padded and re-ordered

A mixed-direction batch costs one forward per direction present (smaller
batches); ``scripts/bench_lass.py`` measures it against one unmasked forward.
Everything else that trains (adapters, ``train_backbone`` parts) is shared.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xlpeft.errors import CorruptFileError, XlpeftValueError
from xlpeft.lightning.metrics import group_rows
from xlpeft.lightning.mlm import select_rows
from xlpeft.lightning.translation import BackbonePart, Modules, TranslationAdaptation
from xlpeft.methods.lass import DEFAULT_TARGETS, Criterion, LanguageMasks, LassConfig, keep_indices, score, target_weights
from xlpeft.ops.files import check_compatible, read_config, write_directory
from xlpeft.ops.artefacts import ArtefactKind
from xlpeft.ops.weights import open_weights

logger = logging.getLogger(__name__)
CONFIG_NAME, WEIGHTS_NAME = "lass_config.json", "lass_masks.safetensors"
WHAT = "lass_masks"
MASKS = ArtefactKind("LaSS masks", CONFIG_NAME, (CONFIG_NAME, WEIGHTS_NAME),
                     lambda meta: isinstance(meta, dict) and meta.get("kind") == "lass")


class _Call(nn.Module):
    """``fn`` as the forward of a module holding ``adapted``, so ``functional_call`` can swap its weights."""

    def __init__(self, adapted: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.adapted, self.fn = adapted, fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


class LassTranslation(TranslationAdaptation):
    """Translation with a language-specific sub-network (mask over the shared weights) per direction.

    Args:
        backbone: A seq2seq model (name or folder), or an encoder warm-started into bert2bert.
        directions: Directions src-tgt, one sub-network each.
        prune: Share of every targeted weight pruned from each direction's sub-network, in [0, 1).
        criterion: Entry score after a direction's fine-tuning: "magnitude" (LaSS) or "change".
        targets: Regex over parameter names of the nn.Linear weights that get masks.
        search_steps: Fine-tuning steps per direction during the mask search.
        search_lr: AdamW learning rate of the mask search.
        masks: A masks folder (save_lass_masks) to use instead of searching.
        export_masks: Folder the searched masks are written to.
        modules: Language modules beside the sub-networks: "none", "monolingual" or "pair".
        languages: Languages given a module (monolingual).
        adapter: Preset name or config dict of each module.
        shared: Name -> preset/config of modules every example runs.
        language_adapters: Language code -> trained module folder to load.
        train_loaded: Train the loaded modules too.
        train_backbone: Further backbone parts that train, shared by all directions.
        encoder_layers: Keep at most this many encoder layers (bert2bert warm start).
        decoder_layers: Keep at most this many decoder layers (bert2bert warm start).
        lang_tokens: Language code -> tag token. Under `xlpeft fit` it follows the data's.
        max_new_tokens: Generation length limit.
        num_beams: Beam size for generation.
        label_smoothing: Label smoothing of the cross-entropy.
        export_model: Folder the whole trained backbone is written to at the end of fit.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the linear decay.
    """

    def __init__(self, backbone: str = "embedded", directions: Sequence[str] = (), prune: float = 0.3,
                 criterion: Criterion = "magnitude", targets: str = DEFAULT_TARGETS, search_steps: int = 50,
                 search_lr: float = 1e-4, masks: str | None = None, export_masks: str | None = None,
                 modules: Modules = "none", languages: Sequence[str] = (), adapter: str | dict = "pfeiffer",
                 shared: Mapping[str, str | dict] | None = None, language_adapters: Mapping[str, str] | None = None,
                 train_loaded: bool = False, train_backbone: BackbonePart = "none",
                 encoder_layers: int | None = None, decoder_layers: int | None = None,
                 lang_tokens: Mapping[str, str] | None = None, max_new_tokens: int = 64, num_beams: int = 1,
                 label_smoothing: float = 0.0, export_model: str | None = None, lr: float = 1e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 0) -> None:
        init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.lass = LassConfig(prune=prune, criterion=criterion, targets=targets, search_steps=search_steps,
                               search_lr=search_lr, directions=tuple(directions))
        super().__init__(backbone, modules=modules, languages=languages, directions=directions, adapter=adapter,
                         shared=shared, language_adapters=language_adapters, train_loaded=train_loaded,
                         train_backbone=train_backbone, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                         lang_tokens=lang_tokens, max_new_tokens=max_new_tokens, num_beams=num_beams,
                         label_smoothing=label_smoothing, export_model=export_model, lr=lr,
                         weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.save_hyperparameters(init_args)
        self.targets = target_weights(self.adapted.model, targets)
        for weight in self.targets.values():
            weight.requires_grad_(True)
        shapes = {n: tuple(w.shape) for n, w in self.targets.items()}
        self.masks = LanguageMasks(self.lass.directions, shapes, {n: self.lass.kept(w.numel())
                                                                   for n, w in self.targets.items()})
        self._touched: set[str] = set()
        if masks:
            self.load_masks(masks)

    # ------------------------------------------------------------------ masks
    @property
    def ready(self) -> bool:
        """Whether every direction has its mask (searched, loaded or restored from a checkpoint)."""
        return bool(self.masks.found)

    def masked_weights(self, direction: str) -> dict[str, torch.Tensor]:
        """``adapted.model.<weight>`` → W ⊙ M_direction (differentiable in W)."""
        return {f"adapted.model.{n}": w * self.masks.dense(direction, n, w.device) for n, w in self.targets.items()}

    def under_mask(self, direction: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with every targeted weight replaced by its ``direction`` sub-network."""
        return torch.func.functional_call(_Call(self.adapted, fn), self.masked_weights(direction), args)

    def grouped(self, batch: Mapping[str, Any], fn: Callable[[Mapping[str, Any]], torch.Tensor],
                pad: float | int | None = None) -> torch.Tensor:
        """``fn`` per direction group of ``batch`` under that direction's mask, rows in batch order.

        ``pad``: outputs differ in their second dimension (generated ids) and are right-padded with it.
        """
        directions = [f"{s}-{t}" for s, t in zip(batch["src_langs"], batch["tgt_langs"], strict=True)]
        device = batch["input_ids"].device
        groups = group_rows(directions, device, host=True)
        if len(groups) == 1:
            return self.under_mask(directions[0], fn, batch)
        outs, order = [], []
        for direction, _, index in groups:
            outs.append(self.under_mask(direction, fn, select_rows(dict(batch), index)))
            order += index
        if pad is not None:
            width = max(o.shape[1] for o in outs)
            outs = [torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad) for o in outs]
        inverse = torch.argsort(torch.tensor(order, device=device))
        return torch.cat(outs).index_select(0, inverse)

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Logits of the labels, each direction under its own sub-network (the full model before the search)."""
        plain = functools.partial(TranslationAdaptation.forward, self)
        if not self.ready:
            return plain(batch)
        if self.training:
            self._touched.update(f"{s}-{t}" for s, t in zip(batch["src_langs"], batch["tgt_langs"]))
        return self.grouped(batch, plain)

    @torch.no_grad()
    def generate_ids(self, batch: Mapping[str, Any], **kwargs: Any) -> torch.Tensor:
        plain = functools.partial(TranslationAdaptation.generate_ids, self, **kwargs)
        if not self.ready:
            return plain(batch)
        pad = self.adapted.model.config.pad_token_id
        return self.grouped(batch, plain, pad=0 if pad is None else pad)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step, then every entry outside the step's masks restored bit for bit."""
        if not self.ready:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        before = {n: w.detach().clone() for n, w in self.targets.items()}
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        touched, self._touched = _every_rank(self._touched), set()  # filled by the closure's training_step(s)
        with torch.no_grad():
            for name, weight in self.targets.items():
                keep = self.masks.union(touched, name, weight.device)
                weight.copy_(torch.where(keep, weight, before[name]))

    # ------------------------------------------------------------------ search
    def search_masks(self, batches: Callable[[], Iterable[Mapping[str, Any]]]) -> dict[str, float]:
        """Find every direction's mask by fine-tuning on its rows of ``batches()``; θ is restored after.

        Returns the pairwise overlap (IoU) of the masks found.
        """
        base = {n: w.detach().clone() for n, w in self.targets.items()}
        was_training = self.training
        self.train()
        found = {}
        try:
            for direction in self.lass.directions:
                self._fine_tune(direction, batches)
                found[direction] = {n: keep_indices(score(self.lass.criterion, base[n], w), self.masks.indices(
                    direction, n).numel()) for n, w in self.targets.items()}
                with torch.no_grad():
                    for n, w in self.targets.items():
                        w.copy_(base[n])
        finally:
            with torch.no_grad():
                for n, w in self.targets.items():
                    w.copy_(base[n])
            self.zero_grad(set_to_none=True)
            self.train(was_training)
        self.masks.set(found)
        overlap = self.masks.overlap()
        logger.info("LaSS masks found for %s (prune %.2f); overlap %s", ", ".join(self.lass.directions),
                    self.lass.prune, {k: round(v, 3) for k, v in overlap.items()})
        return overlap

    def _fine_tune(self, direction: str, batches: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        optimizer = torch.optim.AdamW(self.targets.values(), lr=self.lass.search_lr, weight_decay=0.0)
        done = 0
        while done < self.lass.search_steps:
            before = done
            for batch in batches():
                rows = [i for i, (s, t) in enumerate(zip(batch["src_langs"], batch["tgt_langs"]))
                        if f"{s}-{t}" == direction]
                if not rows:
                    continue
                part = select_rows(dict(batch), rows)
                losses = TranslationAdaptation.token_losses(self, part)
                loss = losses.sum() / (part["labels"] != -100).sum().clamp_min(1)
                loss.backward()
                optimizer.step()
                self.zero_grad(set_to_none=True)
                done += 1
                if done >= self.lass.search_steps:
                    return
            if done == before:
                raise XlpeftValueError(f"the training data has no pair of direction {direction!r}, so its LaSS mask "
                                       "cannot be searched; add it to the data's `directions` or drop it here")

    def on_train_start(self) -> None:
        if self.ready:
            return
        data = getattr(self.trainer, "datamodule", None)
        if data is None:
            raise XlpeftValueError("the LaSS mask search reads the training data from a DataModule; fit with one "
                                   "(ParallelDataModule) or give `masks` (a folder save_lass_masks wrote)")
        device = self.device
        self.search_masks(lambda: (self.trainer.strategy.batch_to_device(b, device) for b in data.train_dataloader()))
        target = self.hparams.export_masks
        if target and self.trainer.is_global_zero:
            self.save_masks(target)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.masks.clear_cache()

    # ------------------------------------------------------------------ files
    def save_masks(self, path: str | os.PathLike) -> Path:
        """Write the masks (flat int64 indices per direction and weight) as an atomic directory."""
        if not self.ready:
            raise XlpeftValueError("no LaSS masks to save yet: search them (fit) or load them first")
        meta = {"kind": "lass", "xlpeft_format": 1, "directions": list(self.lass.directions),
                "weights": {n: list(w.shape) for n, w in self.targets.items()},
                "config": {"prune": self.lass.prune, "criterion": self.lass.criterion, "targets": self.lass.targets},
                "backbone": self.adapted.backbone_info()}
        tensors = {f"{d}::{n}": idx.detach().cpu().contiguous() for d, ws in self.masks.as_dict().items()
                   for n, idx in ws.items()}
        return write_directory(path, meta, tensors, CONFIG_NAME, WEIGHTS_NAME, kind=MASKS)

    def load_masks(self, path: str | os.PathLike) -> None:
        """Load masks saved for this backbone; the module's directions must be among the file's. All or nothing."""
        path = Path(path)
        meta = read_config(path, CONFIG_NAME, WHAT)
        if meta.get("kind") != "lass":
            raise CorruptFileError(f"{path / CONFIG_NAME} is not a LaSS masks config (kind {meta.get('kind')!r})")
        check_compatible(meta.get("backbone"), self.adapted, path, WHAT)
        here = {n: list(w.shape) for n, w in self.targets.items()}
        if meta.get("weights") != here:
            raise XlpeftValueError(f"the LaSS masks at {path} cover other weights than this module's `targets` "
                                   f"({len(meta.get('weights') or {})} vs {len(here)} weights); use the targets "
                                   "they were searched with")
        missing = sorted(set(self.lass.directions) - set(meta.get("directions") or []))
        if missing:
            raise XlpeftValueError(f"the LaSS masks at {path} have no sub-network for {missing}; they hold "
                                   f"{meta.get('directions')}. Search masks for those directions")
        if (meta.get("config") or {}).get("prune") != self.lass.prune:
            raise XlpeftValueError(f"the LaSS masks at {path} were pruned at {(meta.get('config') or {}).get('prune')!r}, "
                                   f"this module at {self.lass.prune!r}; set `prune` to the masks' value")
        keys = {f"{d}::{n}": (self.lass.kept(w.numel()),) for d in meta["directions"] for n, w in self.targets.items()}
        weights = open_weights(path, WEIGHTS_NAME, WHAT, int_keys=dict.fromkeys(keys, "I64"))
        weights.check_shapes(keys, WHAT)
        tensors = weights.load(what=WHAT)
        self.masks.set({d: {n: tensors[f"{d}::{n}"] for n in here} for d in self.lass.directions})


def _every_rank(directions: set[str]) -> list[str]:
    """The directions of this step on any rank: DDP averages gradients, so every rank keeps the same entries."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return sorted(directions)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(directions))
    return sorted(set().union(*map(set, gathered)))
