"""The providers every run starts with, registered ``trylast`` so that any plugin's win.

The loss from the model's outputs or ``loss_fn``; the training, evaluation and prediction steps;
the loaders built from ``train_data`` and ``eval_data``; the optimizer and scheduler built from
the run's specs. ``treadle.Run`` registers this plugin by its entry-point name (``defaults``)
before any other, so it is never named in ``plugins=``. A plugin replaces one of these by
implementing the same hook; the kernel calls a default directly while it is the hook's only
implementation.
"""

from __future__ import annotations

import inspect
import math
import os
import signal
import threading
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sized
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from treadle.config import Config
from treadle.defaults import alone, batch_rows
from treadle.errors import ConfigError, TreadleError, TreadleWarning
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


def check_monitor(run: Run, metric: str, who: str) -> None:
    """Refuse (``ConfigError``) a monitored evaluation metric that can never be logged, and
    warn when it can be logged only once, at the end of ``fit``.

    ``who`` names the option in messages, e.g. ``"early-stopping monitor"``. A metric is
    an evaluation metric when its prefix is an eval set's name (``"eval/..."`` for one
    set, the mapping's keys for several).
    """
    prefix = metric.partition("/")[0] if "/" in metric else None
    names = [str(key) for key in run.eval_data] if isinstance(run.eval_data, Mapping) else ["eval"]
    if prefix is None or (prefix != "eval" and prefix not in names):
        return  # a training or plugin metric: logged on the run's own schedule
    config = run.config
    if run.eval_data is None or prefix not in names:
        logged = (
            "no eval_data was given"
            if run.eval_data is None
            else (f"the eval sets are named {', '.join(map(repr, names))}")
        )
        raise ConfigError(
            f"{who} {metric!r} is an evaluation metric that is never logged: {logged}. "
            "Pass eval_data (with Config.eval_every or eval_every_epoch), or monitor a "
            "metric that is logged."
        )
    if config.eval_every is None and not config.eval_every_epoch:
        when = "once, at the end of fit" if config.eval_at_end else "never (eval_at_end=False)"
        if not config.eval_at_end:
            raise ConfigError(
                f"{who} {metric!r} is never logged: evaluation runs {when}. "
                "Set Config.eval_every or eval_every_epoch."
            )
        warnings.warn(
            f"{who} {metric!r} is logged only {when}, so it can act only once. Set "
            "Config.eval_every (steps) or eval_every_epoch=True to evaluate during training.",
            TreadleWarning,
            stacklevel=3,
        )


@hookimpl(trylast=True)
def on_init_end(run: Run) -> None:
    """Warn about the batching options this plugin's ``make_train_loader`` cannot apply."""
    if not isinstance(run.train_data, DataLoader):
        return
    config, defaults_ = run.config, Config()
    ignored = [
        f"{field}={getattr(config, field)!r}"
        for field in ("shuffle", "drop_last")
        if getattr(config, field) != getattr(defaults_, field)
    ]
    eval_sets = (
        list(run.eval_data.values()) if isinstance(run.eval_data, Mapping) else [run.eval_data]
    )
    batch_size_used = config.eval_batch_size is None and any(
        d is not None and not isinstance(d, DataLoader) for d in eval_sets
    )
    if config.batch_size is not None and not batch_size_used:
        ignored.insert(0, f"batch_size={config.batch_size!r}")
    if ignored:
        warnings.warn(
            f"Config.{', Config.'.join(ignored)} cannot take effect: train_data is a ready "
            "DataLoader, which batches (and shuffles) as it was built. Set these on the "
            "DataLoader, or pass its Dataset as train_data to let treadle batch it.",
            TreadleWarning,
            stacklevel=2,
        )


@hookimpl(trylast=True)
def on_fit_end(run: Run) -> None:
    """Restore the signal handlers; say when ``keep_best`` had nothing to rank checkpoints by
    in this fit."""
    _restore_handlers(run)
    config, fit_state = run.config, run.fit_state
    if not config.keep_best or config.monitor is None or fit_state.monitor_logged:
        return
    if not run.is_main_process or fit_state.preempted:
        return
    logged = sorted(set(run.state.last_metrics) - {"step", "epoch"}) or ["(nothing)"]
    warnings.warn(
        f"Config.monitor {config.monitor!r} was never logged during this fit, so keep_best "
        f"could rank no checkpoint. Logged metrics: {', '.join(logged)}.",
        TreadleWarning,
        stacklevel=2,
    )


# ------------------------------------------------------------------ while a fit runs


#: per run while its fit runs: the signal handlers replaced (to restore), and whether a
#: non-finite training loss was reported already (once per fit)
_PREVIOUS_HANDLERS: weakref.WeakKeyDictionary[Run, dict[int, Any]] = weakref.WeakKeyDictionary()
_WARNED_NON_FINITE: weakref.WeakSet[Run] = weakref.WeakSet()


@hookimpl(trylast=True)
def on_fit_begin(run: Run) -> None:
    """While ``fit`` runs: on SIGTERM or SIGINT, finish the step, save and stop on every rank
    (``run.preempt``).

    The handlers are installed only in the main thread and the previous ones are restored when
    the fit ends. A second signal is handled as it would have been without treadle (SIGINT
    raises ``KeyboardInterrupt``, SIGTERM ends the process).
    """
    _WARNED_NON_FINITE.discard(run)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = _PREVIOUS_HANDLERS[run] = {}

    def handle(signum: int, frame: Any) -> None:
        if run.fit_state.signal is not None:  # the second one: the user insists
            handler = previous.get(signum, signal.SIG_DFL)
            _restore_handlers(run)
            if callable(handler):
                handler(signum, frame)
            elif handler != signal.SIG_IGN:
                signal.raise_signal(signum)
            return
        name = signal.Signals(signum).name
        run.preempt(f"preempted ({name})", signum)
        if run.is_main_process:
            report(2, f"treadle: {name} received; finishing this step, saving and stopping "
                      f"(send {name} again to stop at once)\n")  # fmt: skip

    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[signum] = signal.signal(signum, handle)
        except (ValueError, OSError):  # not settable here (an embedding interpreter)
            continue


@hookimpl(trylast=True)
def on_exception(run: Run) -> None:
    _restore_handlers(run)


def _restore_handlers(run: Run) -> None:
    for signum, handler in _PREVIOUS_HANDLERS.pop(run, {}).items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@hookimpl(trylast=True)
def on_log(run: Run, metrics: Mapping[str, float]) -> None:
    """Warn once per fit when the training loss is not finite, unless a plugin handles that."""
    loss = metrics.get("loss")
    if loss is None or math.isfinite(loss) or run in _WARNED_NON_FINITE:
        return
    _WARNED_NON_FINITE.add(run)
    if not run.is_main_process or any(
        getattr(plugin, "treadle_handles_non_finite", False) is True
        for plugin in run.plugin_manager.get_plugins()
    ):
        return  # a plugin acts on non-finite values itself (numeric-guard does)
    warnings.warn(
        f"the training loss logged at step {run.state.step} is {loss}: the run has "
        "diverged or its data holds non-finite values, and later checkpoints will hold "
        "such weights. Add plugins=['numeric-guard'] to find the first bad step and stop "
        "or skip it.",
        TreadleWarning,
        stacklevel=2,
    )


def report(fd: int, text: str) -> None:
    """Write ``text`` to ``fd`` with one system call; a write that fails is dropped.

    os.write, not print: a signal handler may interrupt a print to the same stream. Nothing
    that reports progress may stop a save: after ``python train.py 2>&1 | tee log`` the
    terminal's Ctrl-C kills ``tee`` too, and the write raises ``BrokenPipeError``.
    """
    try:
        os.write(fd, text.encode())
    except BrokenPipeError:
        discard_output(fd)
    except OSError:  # closed, or a full disk: the message is lost, the run goes on
        pass


def discard_output(fd: int) -> None:
    """Point ``fd``, whose reader is gone, at the null device: later writes to it (warnings, a
    traceback, the interpreter's last flush, which would change the exit code to 120) succeed
    instead of failing again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(null, fd)
    except OSError:
        pass
    finally:
        os.close(null)
