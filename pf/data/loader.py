"""Batches that are sharded over DDP ranks and can restart at any step.

Each epoch's order is DistributedSampler's (a permutation seeded by ``seed + epoch``,
rank ``r`` taking every ``world``-th index), cut into full batches. The batch of global
step ``s`` is batch ``s % batches_per_epoch`` of epoch ``s // batches_per_epoch``, so a
resumed run reads exactly the batches an uninterrupted run would have read, without
replaying the epoch. The DataLoader gets its own generator, so it never draws from the
global torch RNG (which class dropout uses).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset


class _EpochBatches:
    """Batch sampler: the batches of one epoch on this rank, from batch ``start`` on."""

    def __init__(self, sampler: DistributedSampler, batch_size: int, start: int):
        self.indices = list(sampler)
        self.batch_size, self.start = batch_size, start

    def __len__(self) -> int:
        return len(self.indices) // self.batch_size - self.start

    def __iter__(self):
        for b in range(self.start, len(self.indices) // self.batch_size):
            yield self.indices[b * self.batch_size:(b + 1) * self.batch_size]


class ShardedBatches:
    """Endless ``(x, y)`` batches for this rank, starting at global step ``start_step``."""

    def __init__(self, dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, pin_memory: bool = False):
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.batches_per_epoch = self.sampler.num_samples // self.batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{len(dataset)} training examples give {self.sampler.num_samples} per rank, fewer than one batch of "
                f"{batch_size} on each of {world_size} rank(s): lower trainer.batch_size or add data"
            )

    @property
    def per_rank(self) -> int:
        """Training examples this rank reads per epoch."""
        return self.sampler.num_samples

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch

    def iterate(self, start_step: int = 0):
        epoch, start = divmod(start_step, self.batches_per_epoch)
        base = self.dataset
        while isinstance(base, Subset):  # the validation split wraps the dataset
            base = base.dataset
        while True:
            self.sampler.set_epoch(epoch)
            if hasattr(base, "set_epoch"):  # per-epoch randomness of the items (latent flips)
                base.set_epoch(epoch)
            loader = DataLoader(
                self.dataset,
                batch_sampler=_EpochBatches(self.sampler, self.batch_size, start),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                generator=torch.Generator(),  # keeps the global RNG untouched
                persistent_workers=False,
            )
            yield from loader
            epoch, start = epoch + 1, 0


class StreamBatches:
    """Endless batches of an IterableDataset (webdataset shards, split over ranks and workers
    by the dataset itself), one pass per epoch with ``set_epoch``. A stream has no random
    access: a resumed run starts its epoch's stream again and skips the batches already read
    (the same batches as an uninterrupted run, at the cost of reading them once more)."""

    per_rank = "streamed"

    def __init__(self, dataset, batch_size: int, *, num_workers: int = 0, pin_memory: bool = False):
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._epoch_batches: dict[int, int] = {}  # batches each finished epoch gave

    def epoch_of(self, step: int) -> int:
        epoch, seen = 0, 0
        while epoch in self._epoch_batches and seen + self._epoch_batches[epoch] <= step:
            seen += self._epoch_batches[epoch]
            epoch += 1
        return epoch

    def _epoch(self, epoch: int):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, drop_last=True, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, generator=torch.Generator())
        yield from loader

    def iterate(self, start_step: int = 0):
        epoch, skip = 0, int(start_step)
        while True:
            count = 0
            for batch in self._epoch(epoch):
                count += 1
                if skip > 0:
                    skip -= 1
                    continue
                yield batch
            if count == 0:
                raise ValueError(f"the stream gave no full batch of {self.batch_size}: lower trainer.batch_size or add "
                                 f"shards")
            self._epoch_batches[epoch] = count
            epoch += 1
