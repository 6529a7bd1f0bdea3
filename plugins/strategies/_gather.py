"""Evaluation and prediction over a sharded data set: each sample seen once, every rank's
outputs joined in the data set's order. The base of every strategy with one process per device.

A distributed sampler (treadle's ResumableSampler, torch's DistributedSampler) pads the data
set by repetition to a multiple of the world size and gives rank r the positions r, r + world,
r + 2 * world, ...: rank r's i-th sample is at position i * world + r, and positions at or past
the data set's length are padding. Evaluation cuts the padding off each rank's batches;
outputs are joined per rank along the first dimension, gathered as objects, put back in
position order and stripped of the padding.

Structures: a tensor (with a first dimension) and a list hold one row per sample; a mapping or
a tuple hold such values by key or place. Anything else (a 0-dim tensor such as a batch's mean
loss, a number, a string) describes a whole batch: it is dropped from mappings (with a
warning), None in tuples, and an error at the top level (``treadle.evaluation.join_outputs``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from treadle.components import Strategy
from treadle.data import ResumableSampler
from treadle.defaults import batch_rows
from treadle.errors import TreadleError
from treadle.evaluation import join_outputs

__all__ = ["ShardedEvaluation", "first_rows", "interleave_order", "row_count", "take"]


class ShardedEvaluation(Strategy):
    """A strategy whose ranks each evaluate and predict a shard of the data: the sampler's
    padding is cut off, and outputs are gathered from every rank in the data set's order.

    A loader treadle did not shard (no distributed sampler, or no batch size) is left alone:
    each rank evaluates and keeps what it saw, as in one process.
    """

    def eval_steps(
        self, loader: Iterable[Any], step: Callable[[Any], Mapping[str, Any]]
    ) -> Iterator[tuple[Any, Mapping[str, Any], bool]]:
        """A sharded loader ends a rank's share with up to one repeated sample (the sampler's
        padding to a multiple of the world size). It is cut off, so that the loss, the kept
        outputs and the hooks see each sample once."""
        left = self._real_rows(loader)
        if left is None:  # every row is real
            yield from super().eval_steps(loader, step)
            return
        for batch in loader:
            batch = self.to_device(batch)
            size = batch_rows(batch)
            real = left if size > left else None  # with padding: how many of its rows are real
            left = max(left - size, 0)
            if real == 0:
                # Padding only: the forward still runs, so that wrappers using collectives in
                # it (FSDP) stay in step across ranks; it counts for nothing and is seen empty.
                outputs = step(batch)
                empty = {**first_rows(outputs, 0, size), "count": 0}
                yield first_rows(batch, 0, size), empty, False
                continue
            if real:
                batch = first_rows(batch, real, size)
            yield batch, step(batch), True

    def gather_outputs(self, loader: Any, outputs: list[Any], rows: int, hook: str) -> list[Any]:
        """Joined per rank, gathered, put in the data set's order, and batched again as one
        process batches the loader; a loader treadle did not shard keeps each rank's own."""
        shape = self._layout(loader)
        if shape is None:
            return outputs
        local = join_outputs(outputs, hook)
        if local is not None and row_count(local) != rows:
            raise TreadleError(
                f"{hook} returned {row_count(local)} rows for {rows} samples; outputs are gathered "
                "across ranks per sample, so they need one row per sample"
            )
        gathered = self.all_gather_object((_cpu(local), rows))
        order = interleave_order([n for _, n in gathered], shape[0])
        present = [part for part, _ in gathered if part is not None]
        ordered = take(join_outputs(present, hook), order) if present else None
        size = loader.batch_size
        return [take(ordered, slice(i, i + size)) for i in range(0, row_count(ordered), size)]

    def _layout(self, loader: Any) -> tuple[int, int] | None:
        """(data-set length, world size) of a sharded loader whose layout is known; else None
        (one process, or a loader treadle did not shard: each rank keeps its own outputs)."""
        if self.world_size == 1 or getattr(loader, "batch_size", None) is None:
            return None
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableSampler) and sampler.world_size > 1:
            return sampler.length, sampler.world_size
        if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1:
            return len(sampler.dataset), sampler.num_replicas  # type: ignore[arg-type]
        return None

    def _real_rows(self, loader: Any) -> int | None:
        """How many of this rank's samples are real, not the sampler's padding; None where
        every sample is real or the layout is unknown (a loader treadle did not shard).

        Rank r's i-th sample is at position i * world + r, so its padding (at most one sample)
        is at the end of its list, after the first ``ceil((length - r) / world)`` samples.
        """
        shape = self._layout(loader)
        if shape is None:
            return None
        length, world = shape
        rank: int = loader.sampler.rank
        share: int = loader.sampler.num_samples
        return min(share, max(0, -(-(length - rank) // world)))


def first_rows(value: Any, keep: int, rows: int) -> Any:
    """``value`` (a batch, or outputs computed from one) with only its first ``keep`` of
    ``rows`` samples.

    Every tensor whose first dimension is ``rows`` is sliced, and so is a list or tuple of that
    length holding no tensors (strings or numbers, one per sample); mappings and other
    sequences are containers, searched; anything else (a 0-dim loss, a count) is kept as is.
    This reads a batch as ``batch_rows`` does (a list of tensors is a batch's fields).
    """
    if isinstance(value, torch.Tensor):
        return value[:keep] if value.dim() and value.shape[0] == rows else value
    if isinstance(value, Mapping):
        return {key: first_rows(item, keep, rows) for key, item in value.items()}
    if isinstance(value, list | tuple):
        named = hasattr(value, "_fields")
        if not named and len(value) == rows and not any(isinstance(v, _CONTAINERS) for v in value):
            items = list(value[:keep])
        else:
            items = [first_rows(item, keep, rows) for item in value]
        if isinstance(value, list):
            return items
        return type(value)(*items) if named else tuple(items)
    return value


_CONTAINERS = (torch.Tensor, Mapping, list, tuple)


def interleave_order(counts: list[int], length: int) -> list[int]:
    """Where each sample lies in the rank-major concatenation of the ranks' outputs, in position
    order, padding excluded; ``counts[r]`` is the number of rows rank ``r`` produced."""
    world = len(counts)
    offsets = [sum(counts[:rank]) for rank in range(world)]
    order = []
    for position in range(length):
        index, rank = divmod(position, world)
        if index < counts[rank]:
            order.append(offsets[rank] + index)
    return order


def take(value: Any, rows: list[int] | slice) -> Any:
    """The rows ``rows`` of a joined structure."""
    if isinstance(value, torch.Tensor):
        return value[rows] if isinstance(rows, slice) else value[torch.as_tensor(rows)]
    if isinstance(value, Mapping):
        return {key: take(item, rows) for key, item in value.items()}
    if isinstance(value, tuple):
        items = [take(item, rows) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return value[rows] if isinstance(rows, slice) else [value[i] for i in rows]
    return value


def row_count(value: Any) -> int:
    """The number of rows of a joined structure (its first tensor or list)."""
    if isinstance(value, torch.Tensor | list):
        return len(value)
    items = value.values() if isinstance(value, Mapping) else value
    if isinstance(items, Iterable):
        for item in items:
            if item is not None:
                return row_count(item)
    return 0


def _cpu(value: Any) -> Any:
    """A copy with every tensor on the CPU (blocking: it is about to be pickled)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {key: _cpu(item) for key, item in value.items()}
    if isinstance(value, tuple):
        items = [_cpu(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_cpu(item) for item in value]
    return value
