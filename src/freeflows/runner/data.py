"""A Lightning data module over the fixed splits of a :class:`~freeflows.data.base.DataSet`."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ..data.base import DataSet, Split


def _tensors(split: Split) -> TensorDataset:
    return TensorDataset(split.x) if split.c is None else TensorDataset(split.x, split.c)


class SplitDataModule(L.LightningDataModule):
    """Training batches are shuffled per epoch with ``seed + epoch`` (and sharded by rank under
    DDP), so the order depends only on the seed and the epoch: a resumed run sees the same batches."""

    def __init__(self, data: DataSet, batch_size: int, val_batch_size: int, seed: int):
        super().__init__()
        if len(data.train) < batch_size:
            raise ValueError(f"trainer.batch_size={batch_size} exceeds the {len(data.train)} training points")
        self.data, self.batch_size, self.val_batch_size, self.seed = data, batch_size, val_batch_size, seed

    def train_dataloader(self) -> DataLoader:
        ds = _tensors(self.data.train)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = DistributedSampler(
            ds, num_replicas=world, rank=rank, shuffle=True, seed=self.seed, drop_last=True
        )
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_tensors(self.data.val), batch_size=self.val_batch_size, shuffle=False)


def unpack(batch: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    return batch[0], (batch[1] if len(batch) > 1 else None)
