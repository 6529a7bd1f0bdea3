"""The default providers: the loss from the model's outputs or ``loss_fn``; the training,
evaluation and prediction steps; the loaders built from ``train_data`` and ``eval_data``; the
optimizer and scheduler built from the run's specs. Each is registered ``trylast`` (through
``treadle.plugins.defaults``), so a plugin's implementation of the same hook wins.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sized
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from treadle.defaults import alone, batch_rows
from treadle.errors import ConfigError, TreadleError
from treadle.hookspecs import hookimpl
from treadle.state import LossSum

if TYPE_CHECKING:
    from treadle.run import Run


def forward(model: nn.Module, batch: Any) -> Any:
    """Call the model the way the batch is shaped: a mapping → ``model(**batch)``; a sequence
    ``(inputs..., target)`` → ``model(*inputs)`` (every item but the last; a one-item sequence
    → ``model(batch[0])``); anything else → ``model(batch)``."""
    if isinstance(batch, (dict, Mapping)):  # dict first: it spares the ABC check
        return model(**batch)
    if isinstance(batch, list | tuple):
        return model(*batch[:-1]) if len(batch) > 1 else model(batch[0])
    return model(batch)


class _NoLoss(TreadleError):
    """The model's outputs hold no loss (``compute_loss`` adds the step and the batch)."""


def loss_from_outputs(outputs: Any) -> torch.Tensor:
    # on a plain dict, getattr would raise and catch an AttributeError at every step
    loss = outputs.get("loss") if type(outputs) is dict else getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None:
        raise _NoLoss(
            f"the model returned {describe_value(outputs)} with no 'loss'. Return an object "
            "with a .loss attribute or a mapping with a 'loss' key, pass loss_fn=... to "
            "treadle.Run, or implement the compute_loss hook."
        )
    return loss  # type: ignore[no-any-return]


@hookimpl(trylast=True)
def compute_loss(run: Run, model: nn.Module, batch: Any) -> torch.Tensor | LossSum:
    return _loss_of(run, _call_model(run, model, batch), batch)


def _loss_of(run: Run, outputs: Any, batch: Any, during: str = "") -> torch.Tensor | LossSum:
    """The loss of the model's ``outputs``: ``loss_fn``'s if the run has one, else theirs."""
    if run.loss_fn is not None:
        try:
            return run.loss_fn(outputs, batch)
        except TypeError as exc:
            _explain_loss_fn(run, batch, exc)
            raise
    try:
        return loss_from_outputs(outputs)
    except _NoLoss:
        raise _no_loss_error(run, outputs, batch, during) from None


@hookimpl(trylast=True)
def training_step(run: Run, model: nn.Module, batch: Any) -> torch.Tensor | LossSum:
    compute = run.listeners["compute_loss"]  # run.provide, inlined: every micro-batch
    if run.fit_state.plain_forward:  # the forward context would enter nothing: loop.build_step
        loss = compute(run=run, model=model, batch=batch)
    else:
        with run.strategy.forward_context():
            loss = compute(run=run, model=model, batch=batch)
    if loss is None:
        raise TreadleError("no implementation of 'compute_loss' returned a value")
    value = backward_value(loss, run.config.loss_normalization)
    try:
        run.backward(value)
    except (RuntimeError, TypeError, AttributeError) as exc:  # free until raised
        raise loss_error(run, value, exc) from exc
    return loss  # type: ignore[no-any-return]


# ------------------------------------------------------------------ errors, explained
# Each is built only once something failed: the step pays for a try block, which is free.


def _call_model(run: Run, model: nn.Module, batch: Any, during: str = "") -> Any:
    """``forward``, its TypeError explained when the batch does not fit the model."""
    try:
        return forward(model, batch)
    except TypeError as exc:
        _explain_mismatch(run, model, batch, exc, during)
        raise


def _explain_mismatch(
    run: Run, model: nn.Module, batch: Any, exc: TypeError, during: str = ""
) -> None:
    """Raise a TreadleError if ``exc`` is the batch not fitting the model's parameters; return
    if the batch binds (then the TypeError came from inside the model)."""
    mismatch = _batch_mismatch(model, batch)
    if mismatch is not None:
        raise TreadleError(
            f"the batch at step {run.state.step}{during} does not fit the model: {mismatch}"
        ) from exc


def _batch_mismatch(model: nn.Module, batch: Any) -> str | None:
    """Why ``forward(model, batch)`` cannot bind the batch to the model's parameters, or None."""
    target = getattr(model, "forward", model)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    if isinstance(batch, (dict, Mapping)):
        args: tuple[Any, ...] = ()
        kwargs = dict(batch)
        call = "model(**batch)"
        fix = "name the batch's keys after forward's parameters (a collate_fn can rename them)"
    elif isinstance(batch, list | tuple):
        args, kwargs = (tuple(batch[:-1]) if len(batch) > 1 else (batch[0],)), {}
        call = "model(*batch[:-1]): every item but the last, which is the target for loss_fn"
        fix = (
            "to give the model every item, make the batch a mapping (a collate_fn returning "
            "a dict) or implement the compute_loss hook"
        )
    else:
        args, kwargs, call = (batch,), {}, "model(batch)"
        fix = "implement the compute_loss hook to call the model your way"
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        return (
            f"{type(model).__name__}.forward{signature} cannot take {describe_value(batch)} "
            f"({_binding_problems(signature, kwargs) or error}); treadle calls {call}. To fix "
            f"it, {fix}."
        )
    return None


def _binding_problems(signature: inspect.Signature, kwargs: Mapping[str, Any]) -> str:
    """For a mapping batch: every key forward does not take and every parameter left out."""
    if not kwargs:
        return ""
    params = signature.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unexpected = [] if takes_any else [key for key in kwargs if key not in params]
    missing = [
        name
        for name, p in params.items()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and name not in kwargs
    ]
    parts = [f"unexpected key {key!r}" for key in unexpected]
    parts += [f"missing argument {name!r}" for name in missing]
    return "; ".join(parts)


def _explain_loss_fn(run: Run, batch: Any, exc: TypeError) -> None:
    """A loss_fn that takes a target and was given a sequence batch: say how to pass it."""
    if isinstance(batch, list | tuple):
        name = getattr(run.loss_fn, "__qualname__", type(run.loss_fn).__name__)
        raise TreadleError(
            f"loss_fn {name} raised TypeError at step {run.state.step}: {exc}. loss_fn is "
            f"called as loss_fn(outputs, batch) with the whole batch, here "
            f"{describe_value(batch)}; for a loss of (outputs, target), pass "
            f"loss_fn=lambda outputs, batch: {name}(outputs, batch[-1])"
        ) from exc


def _no_loss_error(run: Run, outputs: Any, batch: Any, during: str = "") -> TreadleError:
    example = "batch['labels']" if isinstance(batch, (dict, Mapping)) else "batch[-1]"
    return TreadleError(
        f"at step {run.state.step}{during} the model returned {describe_value(outputs)} with no "
        f"loss, for a batch that is {describe_value(batch)}. Either pass loss_fn to "
        "treadle.Run, called as loss_fn(outputs, batch), e.g. loss_fn=lambda outputs, batch: "
        f"torch.nn.functional.cross_entropy(outputs, {example}); or return the loss from "
        "forward (an object with .loss, or a mapping with a 'loss' key); or implement the "
        "compute_loss hook."
    )


def describe_value(value: Any) -> str:
    """A batch or output in words for messages: its type, keys, shapes and dtypes."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    if isinstance(value, (dict, Mapping)):
        items = ", ".join(f"{key!r}: {_brief(item)}" for key, item in value.items())
        return f"a {type(value).__name__} {{{items}}}"
    if isinstance(value, list | tuple):
        items = ", ".join(_brief(item) for item in value)
        return f"a {type(value).__name__} of {len(value)} ({items})"
    return f"a {type(value).__name__}"


def _brief(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


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
        if alone(run, "compute_loss"):  # forward here, to keep the predictions for metrics
            model_outputs = _call_model(run, model, batch, " (evaluating)")
            loss = _loss_of(run, model_outputs, batch, " (evaluating)")
            outputs["predictions"] = predictions_of(model_outputs)
        else:  # a plugin's compute_loss defines the loss: the model is called through it
            loss = run.provide("compute_loss", run=run, model=model, batch=batch)
    if isinstance(loss, LossSum):
        outputs.update(loss=loss.total / loss.count, count=loss.count)
    else:
        outputs.update(loss=loss, count=batch_rows(batch))
    outputs["labels"] = labels_of(batch)
    return {k: v for k, v in outputs.items() if v is not None}


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
    entry, or the last item of a sequence batch ``(inputs..., target)``; None if there is
    none."""
    if isinstance(batch, Mapping):
        return next((batch[k] for k in _LABEL_KEYS if batch.get(k) is not None), None)
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[-1]
    return None


@hookimpl(trylast=True)
def predict_step(run: Run, model: nn.Module, batch: Any) -> Any:
    with run.strategy.forward_context():
        return _call_model(run, model, batch, " (predicting)")


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
            return with_sampler(data, sampler)
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
            return with_sampler(data, sampler)
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


# ------------------------------------------------------------------ what other plugins use


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


def loss_error(run: Run, loss: Any, exc: BaseException) -> BaseException:
    """A TreadleError saying what is wrong with the training ``loss`` (``exc`` was raised
    back-propagating it), or ``exc`` itself when the loss is a scalar tensor."""
    source = "loss_fn" if run.loss_fn is not None else "compute_loss"
    if isinstance(loss, LossSum):
        loss = loss.total
    if not isinstance(loss, torch.Tensor):
        problem = (
            f"a {type(loss).__name__} ({loss!r}), not a tensor: it was taken out of the graph "
            "(.item(), float(...)), so no gradient can reach the weights. Return the tensor"
        )
    elif loss.numel() != 1:
        problem = (
            f"a tensor of shape {tuple(loss.shape)}, not one number. Reduce it, e.g. "
            "loss.mean(), or use the loss function's reduction='mean'"
        )
    elif not loss.requires_grad:
        problem = (
            "a tensor with no grad_fn: it is detached from the graph (computed under "
            "torch.no_grad(), with .detach() or from .item()), so no gradient can reach the "
            "weights. Compute it from the model's outputs without detaching"
        )
    else:
        return exc
    return TreadleError(
        f"the loss at step {run.state.step} (from {source}) is {problem}. A loss must be "
        "a scalar tensor computed from the model's outputs."
    )
