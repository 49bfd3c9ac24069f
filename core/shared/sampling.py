"""Sampling for data modules (``llmzoo.data.TextDataModule`` and the plugins' ones): which
rows each data-parallel rank reads, shuffled per epoch, resumable mid-epoch."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

from ..errors import DataError


def data_rank(trainer: Any) -> tuple[int, int]:
    """(this process's data rank, number of data ranks): the data-parallel ones. The
    processes of one tensor-parallel or pipeline group share a rank: same batches."""
    if trainer is None:
        return 0, 1
    kw = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kw.get("rank", trainer.global_rank)), int(kw.get("num_replicas", trainer.world_size))


class ResumableSampler(Sampler[int]):
    """Shuffles with seed + epoch, splits across ranks, and can start mid-epoch.

    Each epoch uses the same number of samples on every rank (a whole number of
    global batches); ``start_batch`` skips the batches a resumed run already saw.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0
        self.epoch_offset = 0  # the data epoch minus Lightning's epoch counter (set on resume)
        self.per_rank = (n // (batch_size * world_size)) * batch_size
        if self.per_rank == 0:
            raise DataError(f"only {n} sequences: fewer than one global batch of "
                            f"{batch_size} x {world_size} processes; lower data.batch_size or data.seq_len")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch + self.epoch_offset

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        mine = order[: self.per_rank * self.world_size][self.rank:: self.world_size]
        start, self.start_batch = self.start_batch * self.batch_size, 0
        return iter(mine[start:].tolist())

    def __len__(self) -> int:
        return self.per_rank
