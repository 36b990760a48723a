"""The deterministic training order: epoch e's permutation from (seed, e) alone, resumable at any
iteration, sharded over data-parallel ranks (the rule is explained in fracfx/data/images.py)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fracfx.errors import ConfigError
from fracfx.seeding import mix_seed


class EpochBatchSampler(Sampler):
    """Batches of (epoch, index) keys; epoch e's order is a permutation seeded by (seed, e).

    set_position(epoch, batch) makes the next iteration start at that batch of that epoch (the
    already consumed batches are skipped without touching any data).

    Data-parallel runs give each rank its `rank` and the `world_size`: batch_size stays the
    global batch, and a rank yields keys[rank::world_size] of every global batch (the partition
    torch's DistributedSampler makes of an epoch, here per batch of fracfx's resumable order), so
    the ranks together see exactly the batches of a single-process run.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, shuffle: bool = True, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        if size <= 0:
            raise ConfigError("the training set is empty")
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0
        if world_size > 1:
            _check_shards(size, batch_size, world_size, drop_last)

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def set_position(self, epoch: int, batch: int = 0) -> None:
        if not 0 <= batch < self.batches_per_epoch:
            raise ConfigError(f"batch {batch} is outside 0..{self.batches_per_epoch - 1}")
        self.epoch, self.start_batch = int(epoch), int(batch)

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=generator)

    def global_batch_size(self, batch: int) -> int:
        """Samples in batch `batch` of an epoch, over all ranks."""
        return min(self.batch_size, self.size - batch * self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.permutation(self.epoch).tolist()
        for b in range(self.start_batch, self.batches_per_epoch):
            keys = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.world_size > 1:
                keys = keys[self.rank::self.world_size]
            yield [(self.epoch, i) for i in keys]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def _check_shards(size: int, batch_size: int, world_size: int, drop_last: bool) -> None:
    """Every rank needs at least one sample of every global batch."""
    if batch_size < world_size:
        raise ConfigError(f"--batch_size {batch_size} is the global batch (all ranks together) and cannot feed {world_size} ranks; "
                          f"use a batch size of at least {world_size}")
    rest = size % batch_size
    if rest and not drop_last and rest < world_size:
        raise ConfigError(f"the last batch of each epoch holds {rest} of {size} samples, fewer than the {world_size} ranks; "
                          f"choose --batch_size (or --train_subset) so that {size} % batch_size is 0 or at least {world_size}")


def rank_shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Samples rank, rank + world_size, ... of `dataset` (evaluation split over ranks); the dataset itself for one rank."""
    if world_size == 1:
        return dataset
    return torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))


def train_batches(loader: DataLoader, start_iteration: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Endless (iteration, inputs, targets) from a loader of build_loaders(), from any iteration."""
    sampler = loader.batch_sampler
    if not isinstance(sampler, EpochBatchSampler):
        raise ConfigError("train_batches needs a training loader from fracfx.data.build_loaders")
    iteration = start_iteration
    while True:
        epoch, batch = divmod(iteration, sampler.batches_per_epoch)
        sampler.set_position(epoch, batch)
        for inputs, targets in loader:
            yield iteration, inputs, targets
            iteration += 1
