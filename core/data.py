"""A seeded, rank-aware sampler whose position can be saved and restored without replaying data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["ResumableSampler", "describe_data", "length_of", "with_sampler"]


class ResumableSampler(Sampler[int]):
    """Indices for one rank: a permutation seeded by ``(seed, epoch)``, split across ranks.

    Like ``DistributedSampler`` (the index list is padded by repetition to a multiple of the
    world size, or truncated with ``drop_last``), plus ``skip(n)``: the next iteration starts
    after the first ``n`` indices, so a mid-epoch resume continues with the next unseen sample
    without reading the ones before it.
    """

    def __init__(
        self,
        length: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._start = 0
        if drop_last:
            self.num_samples = length // world_size
        else:
            self.num_samples = -(-length // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, count: int) -> None:
        """Start the next iteration after ``count`` of this rank's indices."""
        self._start = count

    def indices(self) -> list[int]:
        """This rank's full index list for the current epoch."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = self.num_samples * self.world_size
        if total > len(order):
            repeats = -(-total // max(len(order), 1))
            order = (order * repeats)[:total]
        return order[:total][self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.indices()[start:])

    def __len__(self) -> int:
        return self.num_samples - self._start

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed}


def with_sampler(
    loader: DataLoader[Any], sampler: Sampler[int], collate_fn: Any = None
) -> DataLoader[Any]:
    """``loader`` with another sampler (and, if given, collate function); every other setting
    (batch size, workers, pinning, ...) kept. What the kernel does to make a user's DataLoader
    resumable and shardable, and what a plugin replacing the order of samples does too."""
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=collate_fn if collate_fn is not None else loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=loader.persistent_workers,
        prefetch_factor=loader.prefetch_factor if loader.num_workers else None,
    )


def describe_data(data: Any) -> str:
    """``data`` in words for messages: its type and length, and a DataLoader's batching."""
    name = type(data).__name__
    length = length_of(data)
    if isinstance(data, torch.utils.data.DataLoader):
        return (
            f"a DataLoader of {length} batches (batch_size={data.batch_size}, "
            f"drop_last={data.drop_last}) over {describe_data(data.dataset)}"
        )
    if isinstance(data, Iterator):
        return f"a {name} (an iterator: it can be iterated once only)"
    if length is None:
        return f"a {name} (no length)"
    return f"a {name} of length {length}"


def length_of(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
