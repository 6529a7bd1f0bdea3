"""``length-grouped-sampler``: batches of samples of similar length (HF's ``group_by_length``).

Padding a batch to its longest sample wastes compute on short ones; grouping samples of similar
length into the same batch removes most of that padding. The order is HF's
``get_length_grouped_indices``: the data set is permuted (seeded by ``Config.seed`` and the
epoch), cut into *megabatches* of ``megabatch_mult * batch_size`` samples, each megabatch is
sorted by length, longest first, and the megabatch holding the longest sample of all swaps it
into the very first position, so that an out-of-memory error happens at the first step rather
than hours later.

The plugin provides ``make_train_loader``: it builds the DataLoader itself, with a sampler that
is a ``treadle.data.ResumableSampler`` (a mid-epoch resume jumps over the batches already
seen without reading them, and sees exactly the batches the uninterrupted run would have).

Options:

* ``lengths`` (``str | int | Sequence[int] | Callable[[sample], int]``, default
  ``"input_ids"``): each sample's length. A key (``len(sample[key])``, for mapping or tuple
  samples; a ``datasets.Dataset`` column is read in one go), a list with one length per sample,
  or a function of the sample. A key or function reads every sample once, when the loader is
  built.
* ``megabatch_mult`` (``int | None``, default ``None``): megabatch size in batches. ``None`` is
  HF's default: 50, or fewer so that there are at least 4 megabatches.
* ``padding`` (``bool | Mapping[str, float]``, default ``False``): collate samples whose
  tensors differ in length by right-padding them along their first dimension to the batch's
  longest. ``True`` pads with 0, and ``labels`` with -100 (ignored by cross-entropy); a
  mapping gives the value per key (others 0). ``False`` uses the DataLoader's ``collate_fn``
  (torch's default collate for a Dataset), which needs equal lengths.

``train_data`` is a map-style Dataset (batched with ``Config.batch_size``, ``Config.drop_last``,
``Config.num_workers``; ``Config.shuffle=False`` keeps the megabatches in data set order, the
same every epoch) or a DataLoader with a standard sampler (its batch size, collate function,
workers, ``drop_last`` and shuffling are kept; only the sampler is replaced). Anything else
(ready batches, an iterable data set) cannot be regrouped: ``ConfigError``.

Several processes: rank ``r`` takes every ``world_size``-th sample of one length-grouped order
(computed with groups of ``batch_size * world_size``), so the ranks' batches at each step are
disjoint and together form one group of similar length, as one process with the global batch
would see it; the order is padded by repetition to a multiple of the world size, as
``DistributedSampler`` does.

HF Trainer: ``TrainingArguments(group_by_length=True, length_column_name=...)``.
Lightning: none built in.

Example::

    run = treadle.Run(model, train_data=tokenized, config=treadle.Config(batch_size=16),
                      plugins=[{"name": "length-grouped-sampler", "padding": True}])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from treadle.data import ResumableSampler
from treadle.errors import ConfigError
from treadle.hookspecs import hookimpl
from treadle.plugins.defaults import with_sampler

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["LengthGroupedResumableSampler", "LengthGroupedSampler", "length_grouped_indices"]

Lengths = str | int | Sequence[int] | Callable[[Any], int]

#: what ``padding=True`` pads each key with: HF's label padding, ignored by cross-entropy
_DEFAULT_PAD_VALUES: dict[str, float] = {"labels": -100}


def _invalid(option: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(
        f"length-grouped-sampler option {option} = {value!r} is not allowed: {allowed}"
    )


def default_megabatch_mult(count: int, group_size: int) -> int:
    """HF's default: 50 groups per megabatch, or fewer so that there are at least 4."""
    return max(min(count // (group_size * 4), 50), 1)


def length_grouped_indices(
    lengths: Sequence[int],
    group_size: int,
    megabatch_mult: int | None = None,
    generator: torch.Generator | None = None,
    *,
    shuffle: bool = True,
) -> list[int]:
    """HF's ``get_length_grouped_indices``: every ``group_size`` consecutive indices have
    similar lengths, and the longest sample comes first. ``shuffle=False`` starts from the
    data set's order instead of a random permutation."""
    count = len(lengths)
    if count == 0:
        return []
    mult = (
        megabatch_mult if megabatch_mult is not None else default_megabatch_mult(count, group_size)
    )
    order = torch.randperm(count, generator=generator).tolist() if shuffle else list(range(count))
    size = mult * group_size
    megabatches = [
        sorted(order[i : i + size], key=lambda index: lengths[index], reverse=True)
        for i in range(0, count, size)
    ]
    # each megabatch is sorted longest first: move the longest of all to the very front
    maximums = [lengths[megabatch[0]] for megabatch in megabatches]
    longest = int(torch.argmax(torch.tensor(maximums)).item())
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [index for megabatch in megabatches for index in megabatch]


class LengthGroupedResumableSampler(ResumableSampler):
    """A ``ResumableSampler`` whose order is length-grouped (``length_grouped_indices``).

    The group size is ``batch_size * world_size``; rank ``r`` takes positions ``r, r + W, ...``
    of the padded order, so each of its batches of ``batch_size`` comes from one group.
    ``skip(n)`` (from the kernel, on a mid-epoch resume) starts after ``n`` of this rank's
    indices without reading the samples.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        megabatch_mult: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(len(lengths), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.megabatch_mult = megabatch_mult

    def indices(self) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = length_grouped_indices(
            self.lengths,
            self.batch_size * self.world_size,
            self.megabatch_mult,
            generator,
            shuffle=self.shuffle,
        )
        total = self.num_samples * self.world_size
        if total > len(order):  # padded by repetition, as DistributedSampler does
            repeats = -(-total // max(len(order), 1))
            order = (order * repeats)[:total]
        return order[:total][self.rank : total : self.world_size]


class LengthGroupedSampler:
    """Provide the training loader with a length-grouped, seeded, resumable sampler.

    Args:
        lengths: each sample's length: a key of the samples (default ``"input_ids"``), one
            length per sample, or a function of a sample.
        megabatch_mult: batches per megabatch (``None``: HF's default, at most 50).
        padding: pad variable-length tensors when collating (``True``: 0, ``labels`` -100;
            or a mapping key -> value).
    """

    name: ClassVar[str] = "length-grouped-sampler"

    def __init__(
        self,
        lengths: Lengths = "input_ids",
        megabatch_mult: int | None = None,
        padding: bool | Mapping[str, float] = False,
    ) -> None:
        if not (isinstance(lengths, str | int | Sequence) or callable(lengths)) or isinstance(
            lengths, bool
        ):
            raise _invalid(
                "lengths", lengths, "expected a key name, a list of lengths or a function"
            )
        if (
            isinstance(lengths, Sequence)
            and not isinstance(lengths, str)
            and not all(_is_count(n) for n in lengths)
        ):
            raise _invalid("lengths", lengths, "a list of lengths must hold integers >= 0")
        if megabatch_mult is not None and (
            isinstance(megabatch_mult, bool)
            or not isinstance(megabatch_mult, int)
            or megabatch_mult < 1
        ):
            raise _invalid("megabatch_mult", megabatch_mult, "expected an integer >= 1 or None")
        if not isinstance(padding, bool | Mapping):
            raise _invalid("padding", padding, "expected True, False or a mapping key -> value")
        self.lengths = lengths
        self.megabatch_mult = megabatch_mult
        self.padding = padding

    def __repr__(self) -> str:
        return (
            f"LengthGroupedSampler(lengths={self.lengths!r}, "
            f"megabatch_mult={self.megabatch_mult!r}, padding={self.padding!r})"
        )

    @hookimpl
    def make_train_loader(self, run: Run, data: Any) -> Iterable[Any]:
        config = run.config
        if isinstance(data, DataLoader):
            return self._regroup(run, data)
        if not _is_dataset(data):
            raise ConfigError(
                f"length-grouped-sampler needs train_data to be a map-style Dataset or a "
                f"DataLoader over one, to choose which samples go together; got "
                f"{type(data).__name__}. Pass the Dataset (with Config.batch_size), or leave "
                "the plugin out."
            )
        if config.batch_size is None:
            raise ConfigError(
                "train_data is a Dataset, so Config.batch_size must be set (per-device batch size)"
            )
        sampler = self.sampler(run, data, config.batch_size, shuffle=config.shuffle)
        return DataLoader(
            data,
            batch_size=config.batch_size,
            sampler=sampler,
            drop_last=config.drop_last,
            num_workers=config.num_workers,
            collate_fn=self._collate(None),
        )

    def sampler(
        self, run: Run, dataset: Any, batch_size: int, *, shuffle: bool
    ) -> LengthGroupedResumableSampler:
        """The sampler this run's rank uses over ``dataset``."""
        strategy = run.strategy
        return LengthGroupedResumableSampler(
            self.lengths_of(dataset),
            batch_size,
            megabatch_mult=self.megabatch_mult,
            shuffle=shuffle,
            seed=run.config.seed,
            rank=strategy.rank,
            world_size=strategy.world_size,
        )

    def lengths_of(self, dataset: Any) -> list[int]:
        """Every sample's length, by the ``lengths`` option."""
        count = len(dataset)
        spec = self.lengths
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            if len(spec) != count:
                raise _invalid(
                    "lengths",
                    f"<a list of {len(spec)}>",
                    f"train_data has {count} samples: give one length per sample",
                )
            return list(spec)
        if callable(spec):
            return [_as_length(spec(dataset[i]), i, "the lengths function") for i in range(count)]
        column_names = getattr(dataset, "column_names", None)  # a datasets.Dataset: one read
        if isinstance(spec, str) and isinstance(column_names, list) and spec in column_names:
            return [_as_length(len(value), i, spec) for i, value in enumerate(dataset[spec])]
        return [_length_at(dataset[i], spec, i) for i in range(count)]

    def _regroup(self, run: Run, loader: DataLoader[Any]) -> DataLoader[Any]:
        standard = isinstance(loader.sampler, RandomSampler | SequentialSampler)
        if loader.batch_size is None or not standard or not _is_map_dataset(loader.dataset):
            raise ConfigError(
                "length-grouped-sampler replaces the DataLoader's sampler, which needs a "
                "DataLoader over a map-style Dataset with batch_size set and the standard "
                f"sampler; this one has batch_size={loader.batch_size} and sampler "
                f"{type(loader.sampler).__name__}. Pass the Dataset with Config.batch_size instead."
            )
        sampler = self.sampler(
            run,
            loader.dataset,
            loader.batch_size,
            shuffle=isinstance(loader.sampler, RandomSampler),
        )
        return with_sampler(loader, sampler, self._collate(loader.collate_fn))

    def _collate(self, given: Callable[[list[Any]], Any] | None) -> Callable[[list[Any]], Any]:
        from torch.utils.data import default_collate

        if self.padding is False:
            return given if given is not None else default_collate
        if given is not None and given is not default_collate:
            raise _invalid(
                "padding",
                self.padding,
                "the DataLoader has its own collate_fn; pad there, or leave padding=False",
            )
        values = dict(_DEFAULT_PAD_VALUES) if self.padding is True else dict(self.padding)
        return PaddingCollate(values)


class PaddingCollate:
    """Collate samples, right-padding tensors of different first-dimension lengths.

    Mapping samples pad each key with ``values.get(key, 0)``; tuple or list samples pad with 0.
    Anything else goes to torch's ``default_collate``.
    """

    def __init__(self, values: Mapping[str, float]) -> None:
        self.values = dict(values)

    def __call__(self, samples: list[Any]) -> Any:
        from torch.utils.data import default_collate

        first = samples[0]
        if isinstance(first, Mapping):
            return {
                key: self._column([s[key] for s in samples], self.values.get(key, 0))
                for key in first
            }
        if isinstance(first, tuple | list):
            return [self._column([s[i] for s in samples], 0) for i in range(len(first))]
        return default_collate(samples)

    @staticmethod
    def _column(items: list[Any], value: float) -> Any:
        from torch.utils.data import default_collate

        if not all(isinstance(item, torch.Tensor) and item.dim() >= 1 for item in items):
            return default_collate(items)
        longest = max(item.shape[0] for item in items)
        out = items[0].new_full((len(items), longest, *items[0].shape[1:]), value)
        for row, item in enumerate(items):
            out[row, : item.shape[0]] = item
        return out


def _is_dataset(data: Any) -> bool:
    """A map-style data set of samples (a list given as train_data holds ready batches)."""
    from torch.utils.data import Dataset

    sized = hasattr(data, "__len__") and hasattr(data, "__getitem__")
    return sized and (isinstance(data, Dataset) or hasattr(data, "column_names"))


def _is_map_dataset(data: Any) -> bool:
    return (
        hasattr(data, "__len__")
        and hasattr(data, "__getitem__")
        and not isinstance(data, str | bytes | Mapping)
    )


def _length_at(sample: Any, key: str | int, index: int) -> int:
    try:
        value = sample[key]
    except (KeyError, IndexError, TypeError):
        raise _invalid(
            "lengths",
            key,
            f"sample {index} ({type(sample).__name__}) has no item {key!r}; name a key of the "
            "samples, or give a list of lengths or a function sample -> length",
        ) from None
    return _as_length(len(value), index, repr(key))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _as_length(value: Any, index: int, source: str) -> int:
    if not _is_count(value):
        raise _invalid(
            "lengths", source, f"gave {value!r} for sample {index}; lengths are integers >= 0"
        )
    return int(value)
