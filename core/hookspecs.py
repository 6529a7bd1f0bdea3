"""Every hook treadle emits, in the order the loop emits it.

Two kinds of hook. **Events** notify: every implementation is called, return values are
ignored. **Providers** replace a built-in step: they are ``firstresult`` hooks, the kernel's
own implementation is registered ``trylast``, so a plugin's implementation wins.

An implementation takes only the arguments it needs, by name (pluggy passes them)::

    @treadle.hookimpl
    def on_step_end(run, loss): ...

The loop, with every hook at the place it fires (a comment holding the hook's name in angle
brackets marks its firing point; a test checks these markers against the hook specifications
below, both ways)::

    run = Run(...)                                   # components resolved, plugins registered
                                                     # <on_init_end>
    run.fit():
        set-up, once per Run: strategy.setup(), loaders, wrapped model, optimizer, scheduler
            loader = make_train_loader(run, data)    # <make_train_loader>
            optimizer = make_optimizer(run, model)   # <make_optimizer>
            scheduler = make_scheduler(run, optimizer)  # <make_scheduler>
        if resuming: load weights, optimizer, ... state
                                                     # <on_load_checkpoint>
                                                     # <on_fit_begin>
        while not stopped and steps/epochs remain:
                                                     # <on_epoch_begin>
            for each window of grad_accum_steps micro-batches:
                                                     # <on_step_begin>
                for batch in window:
                                                     # <on_micro_step_begin>
                    with strategy.no_sync() unless last in window:
                        loss = training_step(run, model, batch)  # <training_step>
                            with precision autocast:
                                loss = compute_loss(run, model, batch)  # <compute_loss>
                            run.backward(loss):
                                                     # <on_before_backward>
                                strategy.backward(loss)
                                                     # <on_after_backward>
                                                     # <on_micro_step_end>
                strategy.finalize_gradients()        # unscaled, divided, synchronised
                                                     # <on_before_optimizer_step>
                strategy.optimizer_step()            # not if a plugin called run.skip_step()
                                                     # <on_after_optimizer_step>
                scheduler.step(); optimizer.zero_grad(set_to_none=True); state.step += 1
                                                     # <on_step_end>
                if log due:  run.log(train metrics)  # <on_log>
                if eval due: run.evaluate()          # see below
                if save due: run.save()              # see below
        (at epoch end)                               # <on_epoch_end>
        (eval due at epoch end; then requests made at epoch end: log, eval, stop, save)
                                                     # <on_fit_end>
        on any exception escaping the loop           # <on_exception>

    run.evaluate(), per named data set:
        loader = make_eval_loader(run, data)         # <make_eval_loader>
                                                     # <on_eval_begin>
        for batch in loader:
            outputs = eval_step(run, model, batch)   # <eval_step>
                                                     # <on_eval_step_end>
        metrics = {name/loss}
        if implemented: metrics |= compute_metrics(run, name, predictions, labels)
                                                     # <compute_metrics>
                                                     # <on_eval_end>
        run.log(metrics)

    run.save():
        plugins add their state                      # <on_save_checkpoint>
        write to a temporary directory, fsync, rename
                                                     # <on_save_end>

    run.predict(data):
                                                     # <on_predict_begin>
        for batch in loader:
            outputs = predict_step(run, model, batch)  # <predict_step>
                                                     # <on_predict_step_end>
                                                     # <on_predict_end>

A request made by a plugin (``run.request_stop``, ``request_save``, ``request_eval``,
``request_log``, ``request_epoch_end``) is acted on at the next step boundary, after
``on_step_end``, or, when made in ``on_epoch_end`` or the epoch's evaluation, before the next
epoch begins; requests are cleared once acted on. SIGTERM or SIGINT during ``fit`` is a save-and-stop request agreed by
every rank: after the save, ``fit`` raises ``treadle.Preempted`` (exit code 128 + signal).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, overload

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from treadle.run import Run
    from treadle.state import LossSum

PROJECT = "treadle"

_F = TypeVar("_F", bound=Callable[..., Any])


class _Marker(Protocol):
    """The typed face of pluggy's markers: a decorated function keeps its signature."""

    @overload
    def __call__(self, function: _F, /) -> _F: ...
    @overload
    def __call__(self, function: None = None, /, **options: Any) -> Callable[[_F], _F]: ...


hookspec = cast(_Marker, pluggy.HookspecMarker(PROJECT))
hookimpl = cast(_Marker, pluggy.HookimplMarker(PROJECT))

# ---------------------------------------------------------------- events: the run


@hookspec
def on_init_end(run: Run) -> None:
    """The run is composed: components resolved and validated, plugins registered.

    Fires once, at the end of ``Run(...)``, before any compute. (HF: ``on_init_end``.)
    """


@hookspec
def on_fit_begin(run: Run) -> None:
    """``fit()`` starts: the model is wrapped and placed, optimizer and scheduler exist, and a
    resumed checkpoint is loaded. Fires once per ``fit()`` call. (HF: ``on_train_begin``.)
    """


@hookspec
def on_epoch_begin(run: Run, epoch: int) -> None:
    """A pass over the training data starts; ``epoch`` counts from 0. (HF: ``on_epoch_begin``.)"""


@hookspec
def on_step_begin(run: Run) -> None:
    """An optimizer step starts: before its first micro-batch. ``run.state.step`` is the number
    of steps already done. (HF: ``on_step_begin``.)
    """


@hookspec
def on_micro_step_begin(run: Run, batch: Any) -> None:
    """A micro-batch is about to go through ``training_step``. Fires ``grad_accum_steps`` times
    per step (fewer in a short last window). The batch is already on the device.
    """


@hookspec
def on_before_backward(run: Run, loss: torch.Tensor) -> None:
    """``loss`` (the micro-batch's, before precision scaling) is about to be back-propagated."""


@hookspec
def on_after_backward(run: Run) -> None:
    """Backward of one micro-batch is done. Gradients are still scaled and not yet divided by
    the accumulation window, and not synchronised across ranks on a non-final micro-batch.
    """


@hookspec
def on_micro_step_end(run: Run, loss: torch.Tensor | LossSum) -> None:
    """A micro-batch is done; ``loss`` is what ``training_step`` returned, on the device (do
    not call ``.item()`` here unless you accept a host-device synchronisation per micro-batch).
    (HF: ``on_substep_end``, which fires only on non-final micro-batches.)
    """


@hookspec
def on_before_optimizer_step(run: Run, optimizer: torch.optim.Optimizer) -> None:
    """Gradients are final: unscaled, divided by the accumulation window, synchronised.

    The place for clipping and for reading gradient norms. ``run.skip_step(reason)`` called
    here drops the step: no optimizer step, no scheduler step, gradients zeroed, counted in
    ``run.state.skipped_steps``. (HF: ``on_pre_optimizer_step``.)
    """


@hookspec
def on_after_optimizer_step(run: Run, optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` ran (or was skipped by the precision backend: see
    ``run.state.skipped_steps``); the scheduler has not stepped yet. (HF: ``on_optimizer_step``.)
    """


@hookspec
def on_step_end(run: Run, loss: torch.Tensor) -> None:
    """An optimizer step is complete: scheduler stepped, gradients zeroed, ``run.state.step``
    incremented. ``loss`` is the step's loss on the device. Requests made here are acted on
    right after. (HF: ``on_step_end``.)
    """


@hookspec
def on_epoch_end(run: Run, epoch: int) -> None:
    """A pass over the training data ended (or was cut short by a stop). (HF: ``on_epoch_end``.)"""


@hookspec
def on_fit_end(run: Run) -> None:
    """``fit()`` finished normally: after the last step, its log, eval and save. Loggers close
    here. (HF: ``on_train_end``.)
    """


@hookspec
def on_exception(run: Run, exception: BaseException) -> None:
    """An exception escapes ``fit``, ``evaluate`` or ``predict``; it is re-raised afterwards."""


@hookspec
def on_log(run: Run, metrics: Mapping[str, float]) -> None:
    """Metrics to record, as plain floats, with ``"step"`` and ``"epoch"`` included.

    Fires on every rank; loggers write on the main process only. An implementation declared
    ``@treadle.hookimpl(wrapper=True)`` runs before every plain one and may add keys to
    ``metrics`` before it yields, so that every logger receives them in the same record (how
    the throughput, memory and lr-monitor plugins extend the training log). (HF: ``on_log``.)
    """


# ---------------------------------------------------------------- events: evaluation


@hookspec
def on_eval_begin(run: Run, name: str) -> None:
    """An evaluation pass over the data set ``name`` starts (``"eval"`` for a single set)."""


@hookspec
def on_eval_step_end(run: Run, name: str, batch: Any, outputs: Mapping[str, Any]) -> None:
    """One evaluation batch is done; ``outputs`` is what ``eval_step`` returned.
    (HF: ``on_prediction_step``.) In a sharded run, a rank's last batch comes without the
    sampler's padding (a repeated sample): each sample is seen once, over all ranks.
    """


@hookspec
def on_eval_end(run: Run, name: str, metrics: MutableMapping[str, float]) -> None:
    """The pass over ``name`` is done. ``metrics`` (keys prefixed ``"{name}/"``) may be extended
    here before they are logged. (HF: ``on_evaluate``.)
    """


@hookspec
def on_predict_begin(run: Run) -> None:
    """``predict()`` starts."""


@hookspec
def on_predict_step_end(run: Run, batch: Any, outputs: Any) -> None:
    """One prediction batch is done; ``outputs`` is what ``predict_step`` returned."""


@hookspec
def on_predict_end(run: Run, predictions: list[Any]) -> None:
    """``predict()`` is done; ``predictions`` holds every batch's outputs, in order (in a
    distributed run: every rank's, gathered as ``predict()`` returns them). (HF: ``on_predict``.)
    """


# ---------------------------------------------------------------- events: checkpoints


@hookspec
def on_save_checkpoint(run: Run, plugin_state: MutableMapping[str, Any]) -> None:
    """A checkpoint is being written. Add your own state as JSON-serialisable data under a key
    of your own (your plugin's name): ``plugin_state["early-stopping"] = {...}``. Tensors are
    allowed (stored by the checkpoint format); with ``Config.save_async`` they are copied
    before this step goes on, so keep updating yours in place as usual.
    """


@hookspec
def on_save_end(run: Run, path: Path) -> None:
    """A checkpoint is complete at ``path`` (renamed into place; ``latest`` updated).
    With ``Config.save_async`` it fires when the background write is seen complete: at the
    next save or at the end of ``fit``. (HF: ``on_save``.)
    """


@hookspec
def on_load_checkpoint(run: Run, plugin_state: Mapping[str, Any]) -> None:
    """A checkpoint was loaded into model, optimizer, scheduler and state; take back what you
    stored under your key in ``on_save_checkpoint``.
    """


# ---------------------------------------------------------------- providers


@hookspec(firstresult=True)
def make_train_loader(run: Run, data: Any) -> Iterable[Any] | None:
    """Build the training batches from ``train_data``. (HF: ``get_train_dataloader``.)

    The default passes a ``DataLoader`` through (re-sampled across ranks when distributed)
    and builds one from a ``Dataset`` with ``config.batch_size``, a seeded, resumable sampler
    from the strategy, and ``config.num_workers``.
    """


@hookspec(firstresult=True)
def make_eval_loader(run: Run, data: Any) -> Iterable[Any] | None:
    """Build evaluation batches (no shuffling). (HF: ``get_eval_dataloader``.)"""


@hookspec(firstresult=True)
def make_optimizer(run: Run, model: torch.nn.Module) -> torch.optim.Optimizer | None:
    """Build the optimizer for the (wrapped) model. The default uses the ``optimizer`` given to
    the run: a name, ``{"name": ..., **options}``, an instance, or a callable taking the model.
    (HF: ``create_optimizer``.)
    """


@hookspec(firstresult=True)
def make_scheduler(run: Run, optimizer: torch.optim.Optimizer) -> Any | None:
    """Build the learning-rate scheduler; it is stepped after every optimizer step.
    (HF: ``create_scheduler``.)
    """


@hookspec(firstresult=True)
def compute_loss(run: Run, model: torch.nn.Module, batch: Any) -> torch.Tensor | LossSum | None:
    """Forward the batch and return its loss: a scalar mean, or ``treadle.LossSum(total,
    count)`` (the sum of per-item losses and the number of items scored), which
    ``loss_normalization="tokens"`` needs. The default calls the model (``model(**batch)`` for a
    mapping, ``model(*batch[:-1])`` for a sequence ``(inputs..., target)``, ``model(batch)``
    otherwise) and takes
    ``outputs.loss`` / ``outputs["loss"]``, or returns ``loss_fn(outputs, batch)``.
    (HF: ``compute_loss``.)
    """


@hookspec(firstresult=True)
def training_step(run: Run, model: torch.nn.Module, batch: Any) -> torch.Tensor | LossSum | None:
    """One micro-batch: forward, loss and backward. Return the loss as ``compute_loss`` does.

    Replace it for several backward passes or custom updates; call ``run.backward(loss)`` so
    that precision scaling and the backward events still happen. (HF: ``training_step``.)
    """


@hookspec(firstresult=True)
def eval_step(run: Run, model: torch.nn.Module, batch: Any) -> Mapping[str, Any] | None:
    """One evaluation batch under ``torch.no_grad()``; return a mapping with at least
    ``"loss"`` (a scalar tensor) and, if known, ``"count"`` (the number of items it averages),
    ``"predictions"`` and ``"labels"`` (one row per sample, for ``compute_metrics`` and
    metric plugins). (HF: ``prediction_step``.)
    """


@hookspec(firstresult=True)
def compute_metrics(
    run: Run, name: str, predictions: Any, labels: Any
) -> Mapping[str, float] | None:
    """Metrics of a whole evaluation pass over ``name``, from all its predictions and labels.

    Called once per pass, before ``on_eval_end``, and only when implemented: the kernel keeps
    ``eval_step``'s ``"predictions"`` and ``"labels"`` (the default ``eval_step`` takes the
    model's ``logits``/``predictions`` and the batch's ``labels``/``target``/``y`` or second
    item) only then. Both arrive concatenated along the first dimension, in the data set's
    order; in a distributed run they are gathered from every rank (on the CPU), with the
    sampler's padding removed, so each sample counts exactly once. Return plain numbers; keys
    are prefixed ``"{name}/"`` unless they already are. There is no default implementation.
    (HF: ``compute_metrics``.)
    """


@hookspec(firstresult=True)
def predict_step(run: Run, model: torch.nn.Module, batch: Any) -> Any:
    """One prediction batch under ``torch.no_grad()``; the default returns the model's outputs."""
