"""The kernel's own provider implementations, registered ``trylast`` so any plugin's wins."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Sized
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from treadle.data import ResumableSampler
from treadle.errors import ConfigError, TreadleError
from treadle.hookspecs import hookimpl
from treadle.state import LossSum

if TYPE_CHECKING:
    from treadle.run import Run

PLUGIN_NAME = "treadle.defaults"


def forward(model: nn.Module, batch: Any) -> Any:
    """Call the model the way the batch is shaped: mapping → keywords, sequence → first item."""
    if isinstance(batch, (dict, Mapping)):  # dict first: it spares the ABC check
        return model(**batch)
    if isinstance(batch, list | tuple):
        return model(batch[0])
    return model(batch)


def loss_from_outputs(outputs: Any) -> torch.Tensor:
    # on a plain dict, getattr would raise and catch an AttributeError at every step
    loss = outputs.get("loss") if type(outputs) is dict else getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None:
        raise TreadleError(
            f"the model returned {type(outputs).__name__} with no 'loss'. Return an object with "
            "a .loss attribute or a mapping with a 'loss' key, pass loss_fn=... to treadle.Run, "
            "or implement the compute_loss hook."
        )
    return loss  # type: ignore[no-any-return]


@hookimpl(trylast=True)
def compute_loss(run: Run, model: nn.Module, batch: Any) -> torch.Tensor | LossSum:
    outputs = forward(model, batch)
    if run.loss_fn is not None:
        return run.loss_fn(outputs, batch)
    return loss_from_outputs(outputs)


@hookimpl(trylast=True)
def training_step(run: Run, model: nn.Module, batch: Any) -> torch.Tensor | LossSum:
    with run.strategy.forward_context():
        loss = run.provide("compute_loss", run=run, model=model, batch=batch)
    run.backward(backward_value(loss, run.config.loss_normalization))
    return loss  # type: ignore[no-any-return]


def backward_value(loss: torch.Tensor | LossSum, normalization: str) -> torch.Tensor:
    """What to back-propagate; the kernel divides the gradients by the window's divisor."""
    if isinstance(loss, LossSum):
        return loss.total if normalization == "tokens" else loss.total / loss.count
    if normalization == "tokens":
        raise TreadleError(
            "Config.loss_normalization='tokens' needs the loss as treadle.LossSum(total, count) "
            "(sum of per-token losses and the number of scored tokens); compute_loss returned a "
            "plain tensor. Return a LossSum from loss_fn or a compute_loss hook, or use 'mean'."
        )
    return loss


@hookimpl(trylast=True)
def eval_step(run: Run, model: nn.Module, batch: Any) -> Mapping[str, Any]:
    outputs: dict[str, Any] = {}
    with run.strategy.forward_context():
        if _own_loss(run):  # forward here, to keep the model's predictions for metrics
            model_outputs = forward(model, batch)
            if run.loss_fn is not None:
                loss = run.loss_fn(model_outputs, batch)
            else:
                loss = loss_from_outputs(model_outputs)
            outputs["predictions"] = predictions_of(model_outputs)
        else:  # a plugin's compute_loss defines the loss: the model is called through it
            loss = run.provide("compute_loss", run=run, model=model, batch=batch)
    if isinstance(loss, LossSum):
        outputs.update(loss=loss.total / loss.count, count=loss.count)
    else:
        outputs.update(loss=loss, count=batch_rows(batch))
    outputs["labels"] = labels_of(batch)
    return {k: v for k, v in outputs.items() if v is not None}


def _own_loss(run: Run) -> bool:
    """Whether ``compute_loss`` is the kernel's own (no plugin replaced it)."""
    return all(
        impl.plugin_name == PLUGIN_NAME
        for impl in run.plugin_manager.hook.compute_loss.get_hookimpls()
    )


_PREDICTION_KEYS = ("logits", "predictions", "prediction", "preds")
_LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def predictions_of(outputs: Any) -> Any:
    """The model's predictions: a tensor output, else its first ``logits``, ``predictions``,
    ``prediction`` or ``preds`` (key or attribute); None if there is none."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    for key in _PREDICTION_KEYS:
        value = outputs.get(key) if isinstance(outputs, Mapping) else getattr(outputs, key, None)
        if value is not None:
            return value
    return None


def labels_of(batch: Any) -> Any:
    """A batch's labels: its first ``labels``, ``label``, ``targets``, ``target`` or ``y``
    entry, or the second item of a sequence batch; None if there is none."""
    if isinstance(batch, Mapping):
        return next((batch[k] for k in _LABEL_KEYS if batch.get(k) is not None), None)
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[1]
    return None


@hookimpl(trylast=True)
def predict_step(run: Run, model: nn.Module, batch: Any) -> Any:
    with run.strategy.forward_context():
        return forward(model, batch)


def batch_rows(batch: Any) -> int:
    """The number of examples in a batch: the first dimension of its first tensor."""
    if type(batch) is dict or isinstance(batch, Mapping):  # dict first: it spares the ABC check
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    elif isinstance(batch, Iterable) and not isinstance(batch, str | bytes):
        values = batch
    else:
        return 1
    for value in values:
        if isinstance(value, torch.Tensor) and (shape := value.shape):  # () for a scalar
            return int(shape[0])
    return 1


# ------------------------------------------------------------------ loaders


@hookimpl(trylast=True)
def make_train_loader(run: Run, data: Any) -> Iterable[Any]:
    config = run.config
    if isinstance(data, DataLoader):
        if _has_standard_sampler(data):
            # A standard sampler is replaced by a seeded, rank-aware, resumable one with the
            # same shuffling, so that order survives resume and is sharded across ranks.
            shuffle = isinstance(data.sampler, RandomSampler)
            sampler = run.strategy.train_sampler(
                len(data.dataset),  # type: ignore[arg-type]
                shuffle=shuffle,
                seed=config.seed,
                drop_last=False,
            )
            return _rebuild(data, sampler)
        return data
    if _is_map_dataset(data):
        if config.batch_size is None:
            raise ConfigError(
                "train_data is a Dataset, so Config.batch_size must be set (per-device batch size)"
            )
        sampler = run.strategy.train_sampler(
            len(data), shuffle=config.shuffle, seed=config.seed, drop_last=False
        )
        return DataLoader(
            data,
            batch_size=config.batch_size,
            sampler=sampler,
            drop_last=config.drop_last,
            num_workers=config.num_workers,
        )
    return cast(Iterable[Any], data)  # any re-iterable of ready batches (a list, ...)


@hookimpl(trylast=True)
def make_eval_loader(run: Run, data: Any) -> Iterable[Any]:
    if isinstance(data, DataLoader):
        if run.strategy.world_size > 1 and _has_standard_sampler(data):
            sampler = run.strategy.train_sampler(
                len(cast(Sized, data.dataset)), shuffle=False, seed=0, drop_last=False
            )
            return _rebuild(data, sampler)
        return data
    if _is_map_dataset(data):
        batch_size = run.config.eval_batch_size or run.config.batch_size
        if batch_size is None:
            raise ConfigError("eval data is a Dataset, so Config.batch_size must be set")
        sampler = run.strategy.train_sampler(len(data), shuffle=False, seed=0, drop_last=False)
        return DataLoader(
            data, batch_size=batch_size, sampler=sampler, num_workers=run.config.num_workers
        )
    return cast(Iterable[Any], data)


def _is_map_dataset(data: Any) -> bool:
    return isinstance(data, Dataset) and hasattr(data, "__len__") and hasattr(data, "__getitem__")


def _has_standard_sampler(loader: DataLoader[Any]) -> bool:
    return (
        loader.batch_size is not None
        and isinstance(loader.sampler, RandomSampler | SequentialSampler)
        # a DataLoader over any sized, indexable collection (a list too) has a map-style dataset
        and hasattr(loader.dataset, "__len__")
        and hasattr(loader.dataset, "__getitem__")
    )


def _rebuild(loader: DataLoader[Any], sampler: ResumableSampler) -> DataLoader[Any]:
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=loader.persistent_workers,
        prefetch_factor=loader.prefetch_factor if loader.num_workers else None,
    )


# ------------------------------------------------------------------ optimizer and scheduler


@hookimpl(trylast=True)
def make_optimizer(run: Run, model: nn.Module) -> torch.optim.Optimizer:
    spec = run.optimizer_spec
    if isinstance(spec, torch.optim.Optimizer):
        return spec
    factory, options = spec
    return factory(model, **options)  # type: ignore[no-any-return]


@hookimpl(trylast=True)
def make_scheduler(run: Run, optimizer: torch.optim.Optimizer) -> Any:
    spec = run.scheduler_spec
    if spec is None or not isinstance(spec, tuple):
        return spec
    factory, options = spec
    if run.total_steps is None:
        raise ConfigError(
            "a scheduler needs the total number of steps: set Config.max_steps, or give "
            "train data with a length"
        )
    return factory(optimizer, total_steps=run.total_steps, **options)


def sequence_of(value: Any) -> Sequence[Any]:
    if value is None:
        return ()
    if isinstance(value, str | Mapping) or not isinstance(value, Sequence):
        return (value,)
    return value
