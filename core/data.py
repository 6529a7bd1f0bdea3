"""A seeded, rank-aware sampler whose position can be saved and restored without replaying data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler", "describe_data", "length_of"]


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
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = self._start = 0
        self.num_samples = length // world_size if drop_last else -(-length // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, count: int) -> None:
        """Start the next iteration after ``count`` of this rank's indices."""
        self._start = count

    def indices(self) -> list[int]:
        """This rank's full index list for the current epoch."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = self.num_samples * self.world_size
        if total > len(order):  # padded by repetition
            order *= -(-total // max(len(order), 1))
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.indices()[start:])

    def __len__(self) -> int:
        return self.num_samples - self._start

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed}


def describe_data(data: Any) -> str:
    """``data`` in words for messages: its type and length, and a DataLoader's batching."""
    name = type(data).__name__
    length = length_of(data)
    if isinstance(data, torch.utils.data.DataLoader):
        batching = f"batch_size={data.batch_size}, drop_last={data.drop_last}"
        return f"a DataLoader of {length} batches ({batching}) over {describe_data(data.dataset)}"
    if isinstance(data, Iterator):
        return f"a {name} (an iterator: it can be iterated once only)"
    return f"a {name} (no length)" if length is None else f"a {name} of length {length}"


def length_of(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
