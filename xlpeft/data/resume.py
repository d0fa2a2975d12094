"""Training loaders that resume exactly where a checkpoint left them.

A resumed run must see the same batches, in the same order, with the same
masks as the run it resumes. Three rules give that:

* the order of an epoch is a function of ``(seed, epoch)`` alone
  (``EpochSampler``), never the continuation of a generator that a new
  process would start afresh;
* every batch carries its own seed ``f(seed, epoch, batch)``
  (``KeyedDataset`` adds it to each row as ``batch_seed``), so random
  masking does not depend on how far Lightning's prefetching ran ahead;
* the DataModule's ``state_dict`` records how many examples of which epoch
  each rank has *trained on* (batches x batch size; not how many the loader
  has yielded: Lightning prefetches one), and a restored sampler skips them.

    epoch e:  order(seed, e) = [i0 i1 i2 | i3 i4 i5 | i6 ...]   batch b -> seed(seed, e, b)
                                 consumed ^ resume here

Under DDP every rank takes every ``world``-th example of the one order, so
a resume on the same number of ranks is exact too.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from xlpeft.errors import CorruptFileError, XlpeftValueError

log = logging.getLogger(__name__)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed fixed by ``parts`` (same on every machine and run)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class EpochSampler(DistributedSampler):
    """Indices of one epoch as ``(index, batch_seed)``: a permutation, or weighted draws with replacement.

    ``set_epoch`` (called by Lightning at each epoch start) picks the order;
    ``resume(epoch, consumed)`` makes the next iteration start after the
    first ``consumed`` examples of this rank's share of ``epoch`` (the next
    epoch when it was complete). Under ``torch.distributed`` each rank takes
    every ``world``-th example of the same order (padded to equal shares, as
    ``DistributedSampler`` does); being a ``DistributedSampler``, Lightning
    keeps it instead of wrapping it in one whose shuffle a resume could not
    reproduce. ``cycled``: the loader is re-iterated within an epoch (the
    shorter one of a ``CombinedLoader`` in ``max_size_cycle`` mode), so a
    resumed position past this rank's share counts whole passes.
    """

    cycled: bool = False

    def __init__(self, size: int, batch_size: int, seed: int = 0,
                 weights: torch.Tensor | None = None) -> None:
        if size < 1:
            raise XlpeftValueError(f"the training set can be non-empty; got {size} examples. Check the "
                                   "files, languages and limits given to the DataModule")
        # rank and world size are read when iterating, once the process group exists
        super().__init__(range(size), num_replicas=1, rank=0, shuffle=False, seed=int(seed))
        self.size, self.batch_size = size, batch_size
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch, self._skip, self._passes = 0, 0, 0

    @staticmethod
    def _rank_and_world() -> tuple[int, int]:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        return -(-self.size // self._rank_and_world()[1])

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._skip, self._passes = int(epoch), 0, 0

    def resume(self, epoch: int, consumed: int) -> None:
        """Start the next iteration after the first ``consumed`` examples of this rank's share of ``epoch``."""
        self.epoch, self._skip, self._passes = int(epoch), int(consumed), 0

    def order(self, epoch: int, passes: int = 0) -> torch.Tensor:
        """The indices of ``epoch`` (``passes`` > 0: a loader cycled again within the epoch)."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, passes))
        if self.weights is None:
            return torch.randperm(self.size, generator=gen)
        return torch.multinomial(self.weights, self.size, replacement=True, generator=gen)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        share = len(self)
        if self._skip >= share and self.cycled:  # each pass ends with its own (partial) last batch
            passes, batch = divmod(self._skip // self.batch_size, -(-share // self.batch_size))
            self._passes, self._skip = self._passes + passes, batch * self.batch_size
        elif self._skip >= share:  # resumed after the epoch's last batch: the next epoch starts
            self.epoch, self._skip, self._passes = self.epoch + 1, 0, 0
        epoch, passes, skip = self.epoch, self._passes, self._skip
        self._passes, self._skip = passes + 1, 0
        rank, world = self._rank_and_world()
        order = self.order(epoch, passes).tolist()
        positions = [j % self.size for j in range(share * world)][rank::world]  # padded like DistributedSampler
        for k, j in enumerate(positions[skip:], start=skip):
            yield order[j], mix_seed(self.seed, epoch, passes, rank, k // self.batch_size)


class KeyedDataset(Dataset):
    """Rows of ``data`` looked up by ``(index, batch_seed)``, the seed added to each row."""

    def __init__(self, data: Sequence[dict[str, Any]]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        return {**self.data[int(index)], "batch_seed": seed}


class ResumableLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes (Lightning warns "not resumable" otherwise).

    Its position lives in the DataModule's ``state_dict`` (read before the
    loader exists), so the loader's own state is empty.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to load: the DataModule built this loader at its saved position."""


def resumable_loader(data: Sequence[dict[str, Any]], batch_size: int, seed: int, collate_fn: Callable,
                     num_workers: int = 0, weights: torch.Tensor | None = None,
                     position: tuple[int, int] | None = None) -> DataLoader:
    """A training DataLoader over ``data`` whose order and masks resume exactly.

    ``weights``: sample with replacement (temperature sampling), else shuffle.
    ``position``: ``(epoch, consumed examples)`` restored from a checkpoint.
    The loader's own generator seeds its workers, so iterating it never draws
    from the global RNG (dropout's, restored separately by the module).
    """
    sampler = EpochSampler(len(data), batch_size, seed, weights)
    if position is not None:
        sampler.resume(*position)
    return ResumableLoader(KeyedDataset(data), batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                           num_workers=num_workers, generator=torch.Generator().manual_seed(mix_seed(seed, -1)))


def eval_generator(seed: int) -> torch.Generator:
    """A loader generator for evaluation: iterating never touches the global RNG."""
    return torch.Generator().manual_seed(mix_seed(seed, -2))


class ResumableData:
    """Mixin for a LightningDataModule whose ``train_dataloader`` uses ``resumable_loader``.

    ``state_dict`` is read when a checkpoint is written; ``load_state_dict``
    runs before the training loader is requested, so the loader is built at
    the saved position.
    """

    _resume_at: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch = trainer.current_epoch
        if batches >= trainer.num_training_batches:  # the epoch was complete (also under limit_train_batches)
            epoch, batches = epoch + 1, 0
        consumed = batches * int(self.hparams.batch_size)  # per rank
        return {"epoch": int(epoch), "consumed_examples": int(consumed), "world_size": int(trainer.world_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        trainer = getattr(self, "trainer", None)
        saved = state_dict.get("world_size", 1) if isinstance(state_dict, dict) else 1
        if trainer is not None and saved != trainer.world_size:
            log.warning("resuming on %d processes a run saved on %d: the data order continues, but which rank "
                        "sees which example differs from the original run", trainer.world_size, saved)
        try:
            self._resume_at = (int(state_dict["epoch"]), int(state_dict["consumed_examples"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"the checkpoint's data position can be {{'epoch': int, 'consumed_examples': "
                                   f"int}}; got {state_dict!r}. Was it written by another DataModule?") from exc

    def take_position(self) -> tuple[int, int] | None:
        """The restored position, once: a later ``train_dataloader`` (a reload) starts afresh."""
        position, self._resume_at = self._resume_at, None
        return position
