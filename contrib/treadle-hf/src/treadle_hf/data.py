"""Hugging Face data on treadle: ``datasets.Dataset`` inputs and HF data collators.

Two ways in, same behaviour:

- ``loader(dataset, model, collator=..., batch_size=...)`` builds a ``DataLoader`` to pass as
  ``train_data``/``eval_data`` (treadle re-samples a plain ``DataLoader`` with its seeded,
  resumable sampler and keeps the collator);
- the ``hf-data`` plugin (``plugins=[{"name": "hf-data", "collator": collator}]``, or
  ``treadle_hf.data.HFData(collator)``) lets ``train_data=dataset`` be given as it is: it builds
  the loaders from ``Config.batch_size`` / ``eval_batch_size`` and the strategy's sampler.

Either way, columns the model's ``forward`` does not accept are dropped first, as the HF
Trainer's ``remove_unused_columns=True`` does (``label``, ``label_ids`` and ``label_names`` are
kept: collators rename them), with one log line naming them. Without a collator, HF's
``default_data_collator`` stacks the rows.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import treadle

if TYPE_CHECKING:
    from treadle import Run

__all__ = ["HFData", "drop_unused_columns", "forward_columns", "loader"]

logger = logging.getLogger(__name__)

Collator = Callable[[list[Any]], Any]


def _base_model(model: nn.Module) -> nn.Module:
    """The model whose ``forward`` names the inputs: a PEFT model's base model, else itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def forward_columns(model: nn.Module, label_names: Iterable[str] | None = None) -> list[str]:
    """The columns HF's ``remove_unused_columns`` keeps: ``forward``'s parameters, plus
    ``label``, ``label_ids`` (collators rename them ``labels``) and ``label_names``."""
    params = list(inspect.signature(_base_model(model).forward).parameters)
    extra = ["label", "label_ids", *(label_names or ())]
    return params + [name for name in extra if name not in params]


def _is_hf_dataset(data: Any) -> bool:
    # by module name: importing datasets only to ask would cost every run a heavy import
    return type(data).__module__.split(".", 1)[0] == "datasets" and hasattr(data, "column_names")


def _log_dropped(model: nn.Module, dropped: Sequence[str], description: str) -> None:
    name = type(_base_model(model)).__name__
    logger.info(
        "treadle-hf: dropped the %s column(s) %s: `%s.forward` does not take them "
        "(as the HF Trainer's remove_unused_columns=True)",
        description,
        ", ".join(sorted(dropped)),
        name,
    )


def drop_unused_columns(
    dataset: Any,
    model: nn.Module,
    *,
    label_names: Iterable[str] | None = None,
    description: str = "training",
) -> Any:
    """``dataset`` (a ``datasets.Dataset``) without the columns ``model.forward`` does not take.

    Logs one line naming the dropped columns; raises ``treadle.ConfigError`` if no column is
    left. Any other dataset is returned unchanged (``loader`` drops its rows' extra keys in the
    collate function instead).
    """
    if not _is_hf_dataset(dataset):
        return dataset
    keep = forward_columns(model, label_names)
    dropped = [c for c in dataset.column_names if c not in keep]
    if len(dropped) == len(dataset.column_names):
        raise treadle.ConfigError(
            f"no column of the {description} data ({', '.join(dataset.column_names)}) is an "
            f"argument of {type(_base_model(model)).__name__}.forward ({', '.join(keep)}); "
            "rename the columns, or pass remove_unused_columns=False"
        )
    if dropped:
        _log_dropped(model, dropped, description)
        dataset = dataset.remove_columns(dropped)
    return dataset


class _DropKeys:
    """A collator wrapper dropping the keys of mapping rows that ``forward`` does not take (for
    datasets that are not ``datasets.Dataset``); logs the dropped keys once."""

    def __init__(self, collator: Collator, model: nn.Module, keep: list[str], description: str):
        self.collator, self.model, self.keep, self.description = collator, model, keep, description
        self.logged = False

    def __call__(self, rows: list[Any]) -> Any:
        if rows and isinstance(rows[0], Mapping):
            dropped = sorted({key for row in rows for key in row if key not in self.keep})
            if dropped:
                if not self.logged:
                    self.logged = True
                    _log_dropped(self.model, dropped, self.description)
                rows = [{k: v for k, v in row.items() if k in self.keep} for row in rows]
        return self.collator(rows)


def _collate_fn(
    dataset: Any,
    model: nn.Module,
    collator: Collator | None,
    remove_unused_columns: bool,
    label_names: Iterable[str] | None,
    description: str,
) -> tuple[Any, Collator]:
    if collator is None:
        from transformers import default_data_collator

        collator = default_data_collator
    if not remove_unused_columns:
        return dataset, collator
    if _is_hf_dataset(dataset):
        return drop_unused_columns(
            dataset, model, label_names=label_names, description=description
        ), collator
    return dataset, _DropKeys(collator, model, forward_columns(model, label_names), description)


def loader(
    dataset: Any,
    model: nn.Module,
    *,
    collator: Collator | None = None,
    batch_size: int = 8,
    shuffle: bool = False,
    sampler: Sampler[int] | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
    remove_unused_columns: bool = True,
    label_names: Iterable[str] | None = None,
    description: str = "training",
) -> DataLoader[Any]:
    """A ``DataLoader`` over ``dataset`` (a ``datasets.Dataset`` or any map-style dataset of
    mapping rows) for ``model``, as the HF Trainer builds one.

    Args:
        dataset: the rows.
        model: the model the batches are for; its ``forward`` decides which columns stay.
        collator: an HF data collator (``DataCollatorWithPadding(tokenizer)``, ...) or any
            ``collate_fn``; default: ``transformers.default_data_collator``.
        batch_size, shuffle, sampler, drop_last, num_workers: as for ``DataLoader``. In a run,
            treadle replaces a standard sampler by its seeded, resumable one.
        remove_unused_columns: drop the columns ``forward`` does not take (HF's default).
        label_names: extra columns to keep (HF's ``TrainingArguments.label_names``).
        description: the data's role in the log line ("training", "evaluation").
    """
    dataset, collate = _collate_fn(
        dataset, model, collator, remove_unused_columns, label_names, description
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        collate_fn=collate,
        drop_last=drop_last,
        num_workers=num_workers,
    )


class HFData:
    """The ``hf-data`` plugin: ``train_data``/``eval_data`` given as a ``datasets.Dataset`` (or
    any torch map-style ``Dataset`` of mapping rows) become loaders through ``collator``, with
    unused columns dropped. Other data (a ``DataLoader``, a list of batches) is left to treadle.

    Args:
        collator: an HF data collator or any ``collate_fn``; default
            ``transformers.default_data_collator``.
        remove_unused_columns: drop the columns ``forward`` does not take (HF's default).
        label_names: extra columns to keep.
    """

    name: ClassVar[str] = "hf-data"

    def __init__(
        self,
        collator: Collator | None = None,
        *,
        remove_unused_columns: bool = True,
        label_names: Iterable[str] | None = None,
    ) -> None:
        self.collator = collator
        self.remove_unused_columns = remove_unused_columns
        self.label_names = list(label_names) if label_names is not None else None

    def __repr__(self) -> str:
        return f"HFData(collator={self.collator!r})"

    def _applies(self, data: Any) -> bool:
        return _is_hf_dataset(data) or (
            isinstance(data, Dataset) and hasattr(data, "__len__") and hasattr(data, "__getitem__")
        )

    def _build(self, run: Run, data: Any, *, train: bool) -> DataLoader[Any]:
        config = run.config
        batch_size = config.batch_size if train else (config.eval_batch_size or config.batch_size)
        if batch_size is None:
            raise treadle.ConfigError(
                "hf-data builds the loaders from Config.batch_size (per-device batch size); set it"
            )
        dataset, collate = _collate_fn(
            data,
            run.model,
            self.collator,
            self.remove_unused_columns,
            self.label_names,
            "training" if train else "evaluation",
        )
        sampler = run.strategy.train_sampler(
            len(dataset),
            shuffle=config.shuffle if train else False,
            seed=config.seed if train else 0,
            drop_last=False,
        )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            drop_last=config.drop_last if train else False,
            num_workers=config.num_workers,
        )

    @treadle.hookimpl
    def make_train_loader(self, run: Run, data: Any) -> Iterable[Any] | None:
        return self._build(run, data, train=True) if self._applies(data) else None

    @treadle.hookimpl
    def make_eval_loader(self, run: Run, data: Any) -> Iterable[Any] | None:
        return self._build(run, data, train=False) if self._applies(data) else None
