"""Training loaders that resume exactly where a checkpoint left them.

A resumed run must see the same batches, in the same order, with the same
masks as the run it resumes. Three rules give that:

* the order of an epoch is a function of ``(seed, epoch)`` alone
  (``EpochSampler``), never the continuation of a generator that a new
  process would start afresh;
* every batch carries its own seed ``f(seed, epoch, batch)``
  (``KeyedDataset`` adds it to each row as ``batch_seed``), so random
  masking does not depend on how far Lightning's prefetching ran ahead;
* the DataModule's ``state_dict`` records how many batches of which epoch
  the *trainer* has consumed (not how many the loader has yielded: Lightning
  prefetches one), and a restored sampler skips them.

    epoch e:  order(seed, e) = [i0 i1 i2 | i3 i4 i5 | i6 ...]   batch b -> seed(seed, e, b)
                                 consumed ^ resume here
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from xlpeft.errors import CorruptFileError, XlpeftValueError


def mix_seed(*parts: int) -> int:
    """A 63-bit seed fixed by ``parts`` (same on every machine and run)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class EpochSampler(Sampler[tuple[int, int]]):
    """Indices of one epoch as ``(index, batch_seed)``: a permutation, or weighted draws with replacement.

    ``set_epoch`` (called by Lightning at each epoch start) picks the order;
    ``resume(epoch, consumed)`` makes the next iteration start after the
    ``consumed`` batches of ``epoch`` (the next epoch when it was complete).
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0,
                 weights: torch.Tensor | None = None) -> None:
        if size < 1:
            raise XlpeftValueError(f"the training set can be non-empty; got {size} examples. Check the "
                                   "files, languages and limits given to the DataModule")
        self.size, self.batch_size, self.seed = size, batch_size, int(seed)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch, self._skip, self._passes = 0, 0, 0

    def __len__(self) -> int:
        return self.size

    @property
    def batches(self) -> int:
        """Batches per epoch (the last one may be short)."""
        return -(-self.size // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._skip, self._passes = int(epoch), 0, 0

    def resume(self, epoch: int, consumed: int) -> None:
        """Start the next iteration after ``consumed`` batches of ``epoch``."""
        if consumed >= self.batches:
            epoch, consumed = epoch + 1, 0
        self.epoch, self._skip, self._passes = int(epoch), int(consumed), 0

    def order(self, epoch: int, passes: int = 0) -> torch.Tensor:
        """The indices of ``epoch`` (``passes`` > 0: a loader cycled again within the epoch)."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, passes))
        if self.weights is None:
            return torch.randperm(self.size, generator=gen)
        return torch.multinomial(self.weights, self.size, replacement=True, generator=gen)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, passes, skip = self.epoch, self._passes, self._skip
        self._passes, self._skip = passes + 1, 0
        order = self.order(epoch, passes).tolist()
        for j in range(skip * self.batch_size, self.size):
            batch = j // self.batch_size
            yield order[j], mix_seed(self.seed, epoch, passes, batch)


class KeyedDataset(Dataset):
    """Rows of ``data`` looked up by ``(index, batch_seed)``, the seed added to each row."""

    def __init__(self, data: Sequence[dict[str, Any]]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        return {**self.data[int(index)], "batch_seed": seed}


def resumable_loader(data: Sequence[dict[str, Any]], batch_size: int, seed: int, collate_fn: Callable,
                     num_workers: int = 0, weights: torch.Tensor | None = None,
                     position: tuple[int, int] | None = None) -> DataLoader:
    """A training DataLoader over ``data`` whose order and masks resume exactly.

    ``weights``: sample with replacement (temperature sampling), else shuffle.
    ``position``: ``(epoch, consumed batches)`` restored from a checkpoint.
    The loader's own generator seeds its workers, so iterating it never draws
    from the global RNG (dropout's, restored separately by the module).
    """
    sampler = EpochSampler(len(data), batch_size, seed, weights)
    if position is not None:
        sampler.resume(*position)
    return DataLoader(KeyedDataset(data), batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
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
        consumed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch = trainer.current_epoch
        if consumed >= trainer.num_training_batches:  # the epoch was complete (also under limit_train_batches)
            epoch, consumed = epoch + 1, 0
        return {"epoch": int(epoch), "consumed_batches": int(consumed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            self._resume_at = (int(state_dict["epoch"]), int(state_dict["consumed_batches"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"the checkpoint's data position can be {{'epoch': int, 'consumed_batches': "
                                   f"int}}; got {state_dict!r}. Was it written by another DataModule?") from exc

    def take_position(self) -> tuple[int, int] | None:
        """The restored position, once: a later ``train_dataloader`` (a reload) starts afresh."""
        position, self._resume_at = self._resume_at, None
        return position
