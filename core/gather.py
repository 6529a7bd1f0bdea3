"""Outputs of every rank, joined in the data set's order: the gathering behind a distributed
``predict()`` and ``compute_metrics``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DistributedSampler

from treadle.data import ResumableSampler
from treadle.errors import TreadleError, TreadleWarning

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["collect", "first_rows", "interleave_order", "layout", "real_rows", "row_count", "take"]

#
# A distributed sampler (treadle's ResumableSampler, torch's DistributedSampler) pads the data
# set by repetition to a multiple of the world size and gives rank r the positions r, r + world,
# r + 2 * world, ...: rank r's i-th sample is at position i * world + r, and positions at or past
# the data set's length are padding. Outputs are joined per rank along the first dimension,
# gathered as objects, put back in position order and stripped of the padding.
#
# Structures: a tensor (with a first dimension) and a list hold one row per sample; a mapping
# or a tuple hold such values by key or place. Anything else (a 0-dim tensor such as a batch's
# mean loss, a number, a string) describes a whole batch: it is dropped from mappings (with a
# warning), None in tuples, and an error at the top level.


def layout(run: Run, loader: Any) -> tuple[int, int] | None:
    """(data-set length, world size) of a sharded loader whose layout is known; else None
    (one process, or a loader treadle did not shard: each rank keeps its own outputs)."""
    if run.strategy.world_size == 1 or getattr(loader, "batch_size", None) is None:
        return None
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, ResumableSampler) and sampler.world_size > 1:
        return sampler.length, sampler.world_size
    if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1:
        return len(sampler.dataset), sampler.num_replicas  # type: ignore[arg-type]
    return None


def real_rows(run: Run, loader: Any) -> int | None:
    """How many of this rank's samples are real, not the sampler's padding; None where every
    sample is real or the layout is unknown (one process, a loader treadle did not shard).

    Rank r's i-th sample is at position i * world + r, so its padding (at most one sample) is
    at the end of its list, after the first ``ceil((length - r) / world)`` samples.
    """
    shape = layout(run, loader)
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


def collect(run: Run, loader: Any, parts: list[Any], rows: int, hook: str) -> Any:
    """Per-batch outputs as one structure: this process's, or every rank's in data-set order."""
    dropped: list[str] = []
    shape = layout(run, loader)
    local = _concat(parts, dropped, "") if parts else None
    if local is _BATCH_LEVEL:
        raise TreadleError(
            f"{hook} returned one {type(parts[0]).__name__} per batch; outputs are joined per "
            "sample: return tensors with one row per sample, or a dict, tuple or list of them"
        )
    if shape is not None:
        if local is not None and row_count(local) != rows:
            raise TreadleError(
                f"{hook} returned {row_count(local)} rows for {rows} samples; outputs are gathered "
                "across ranks per sample, so they need one row per sample"
            )
        gathered = run.strategy.all_gather_object((_cpu(local), rows))
        order = interleave_order([n for _, n in gathered], shape[0])
        present = [part for part, _ in gathered if part is not None]
        local = take(_concat(present, dropped, ""), order) if present else None
    if dropped:
        warnings.warn(
            f"{hook}: values that describe a whole batch, not one sample each, were dropped "
            f"when joining outputs: {', '.join(sorted(set(dropped)))}",
            TreadleWarning,
            stacklevel=4,
        )
    return local


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


class _BatchLevel:
    pass


_BATCH_LEVEL = _BatchLevel()


def _concat(parts: list[Any], dropped: list[str], path: str) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return _BATCH_LEVEL
        try:
            return torch.cat(parts)
        except RuntimeError:  # rows of different shapes (sequences of different lengths)
            return [row for part in parts for row in part.unbind(0)]
    if isinstance(first, Mapping):
        joined = {}
        for key in first:
            value = _concat([part[key] for part in parts], dropped, f"{path}{key}.")
            if value is _BATCH_LEVEL:
                dropped.append(f"{path}{key}")
            else:
                joined[key] = value
        return joined
    if isinstance(first, tuple):
        items: list[Any] = []
        for place in range(len(first)):
            value = _concat([part[place] for part in parts], dropped, f"{path}{place}.")
            if value is _BATCH_LEVEL:
                dropped.append(f"{path}[{place}]")
            items.append(None if value is _BATCH_LEVEL else value)
        return type(first)(*items) if hasattr(first, "_fields") else tuple(items)
    if isinstance(first, list):
        return [row for part in parts for row in part]
    if first is None:
        return None
    return _BATCH_LEVEL


def take(value: Any, rows: list[int] | slice) -> Any:
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
