"""A Lightning data module over the fixed splits of a :class:`~freeflows.data.base.DataSet`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from ..data.base import DataSet, Split


def _tensors(split: Split) -> TensorDataset:
    return TensorDataset(split.x) if split.c is None else TensorDataset(split.x, split.c)


class EpochShuffle(Sampler[int]):
    """Shuffles with ``seed + epoch`` and keeps this rank's share (every ``world``-th index),
    starting after the batches of this epoch that were already used.

    The epoch and the start are read from ``epoch_fn`` and ``start_fn`` when the first index is
    drawn, not when the iterator is made: a resumed run (whose loop state is restored after the
    loaders are built) shuffles its epoch exactly as the uninterrupted run did, and skips the
    ``start_fn()`` batches of ``batch_size`` indices that the run had used before its checkpoint,
    so the rest of the epoch sees the same batches in the same order.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        epoch_fn: Callable[[], int],
        world: int = 1,
        rank: int = 0,
        start_fn: Callable[[], int] = lambda: 0,
        batch_size: int = 1,
    ):
        self.n, self.seed, self.epoch_fn, self.world, self.rank = n, seed, epoch_fn, world, rank
        self.start_fn, self.batch_size = start_fn, batch_size

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch_fn())
        perm = torch.randperm(self.n, generator=g)[: len(self) * self.world]
        yield from perm[self.rank :: self.world][self.start_fn() * self.batch_size :].tolist()


class SplitDataModule(L.LightningDataModule):
    """Training batches are shuffled per epoch with ``seed + epoch`` (and sharded by rank under
    DDP), so the order depends only on the seed and the epoch: a resumed run sees the same batches,
    also when it resumes in the middle of an epoch."""

    def __init__(self, data: DataSet, batch_size: int, val_batch_size: int, seed: int):
        super().__init__()
        if len(data.train) < batch_size:
            raise ValueError(f"trainer.batch_size={batch_size} exceeds the {len(data.train)} training points")
        self.data, self.batch_size, self.val_batch_size, self.seed = data, batch_size, val_batch_size, seed

    def _batches_done(self) -> int:
        """Training batches of the current epoch already taken (restored from a checkpoint on resume)."""
        if self.trainer is None:
            return 0
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def train_dataloader(self) -> DataLoader:
        """Batches of the training split in :class:`EpochShuffle` order for this rank, the last partial
        batch dropped."""
        ds = _tensors(self.data.train)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        epoch = (lambda: self.trainer.current_epoch) if self.trainer else (lambda: 0)
        sampler = EpochShuffle(len(ds), self.seed, epoch, world, rank, self._batches_done, self.batch_size)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of the validation split, in order."""
        return DataLoader(_tensors(self.data.val), batch_size=self.val_batch_size, shuffle=False)


def unpack(batch: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a loader's batch into values and conditions.

    Args:
        batch: ``[x]`` or ``[x, c]``, as a :class:`~torch.utils.data.TensorDataset` yields it.

    Returns:
        ``(x, c)``, with ``c`` ``None`` for a batch without conditions.
    """
    return batch[0], (batch[1] if len(batch) > 1 else None)
