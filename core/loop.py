"""The loop: ``fit``, ``evaluate`` and ``predict``. It emits hooks and calls components through
their interfaces; it names no backend. The pseudocode it follows is in ``treadle.hookspecs``.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from treadle import checkpoint, defaults
from treadle.components import Precision, Strategy, move_to_device
from treadle.data import ResumableSampler, describe_data, length_of
from treadle.defaults import batch_rows
from treadle.errors import ConfigError, TreadleError, TreadleWarning
from treadle.evaluation import evaluate
from treadle.state import LossSum, State

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["fit"]

# Requests from plugins, kept as bits so that ranks can agree on them with one reduction.
# PREEMPT: a rank received SIGTERM/SIGINT; every rank then saves, stops and exits alike.
# FINAL: the stop is part of the run's state (``request_stop(final=True)``): the checkpoint of
# that step records it, and resuming from it trains no further.
# END_EPOCH: the rest of the current epoch is skipped (``run.request_epoch_end()``).
STOP, SAVE, EVAL, LOG, PREEMPT, FINAL, END_EPOCH = 1, 2, 4, 8, 16, 32, 64


def fit(run: Run) -> State:
    config, state, fit_state = run.config, run.state, run.fit_state
    run.setup()
    loader = run.provide("make_train_loader", run=run, data=run.train_data)
    _check_iterable(run, loader)
    batches_per_epoch = length_of(loader)
    if batches_per_epoch == 0:  # known now: say so before building anything else
        raise _no_batch_error(run, loader, state.epoch)
    _check_accumulation(config.grad_accum_steps, batches_per_epoch)
    # known before resuming: the checkpoint's data position is checked against them
    fit_state.train_loader, fit_state.batches_per_epoch = loader, batches_per_epoch
    max_epochs, run.total_steps = _plan(run, batches_per_epoch)
    run.setup_optimizer()
    if config.resume is not None and not fit_state.resumed:
        checkpoint.resume(run)
    if fit_state.resumed_stop is not None:
        return _already_stopped(run, fit_state.resumed_stop)
    run.clear_stop()
    fit_state.stop_reason = fit_state.final_stop = None  # an earlier fit's stop is not this one's
    run.refresh_listeners()  # and with them, the step is built anew
    run.wrapped_model.train()
    meter = _Meter(run)
    first_step = state.step
    try:
        run.emit("on_fit_begin", run=run)
        _epochs(run, meter, max_epochs)
        _finish(run, meter)
    except Exception as exc:  # not KeyboardInterrupt, SystemExit, Preempted: not failures
        try:
            checkpoint.finish_pending(run)  # a save in flight completes whatever happened
        except Exception as failure:
            exc.add_note(f"treadle: {failure}")
        _save_after_failure(run, exc, first_step)
        raise
    return state


def _epochs(run: Run, meter: _Meter, max_epochs: int | None) -> None:
    """Train epoch after epoch until a limit or a stop."""
    config, state, fit_state = run.config, run.state, run.fit_state
    loader = fit_state.train_loader
    while not fit_state.stopping and not _limit_reached(run, max_epochs):
        epoch = state.epoch
        run.emit("on_epoch_begin", run=run, epoch=epoch)
        for window in _windows(_epoch_batches(run, loader), config.grad_accum_steps):
            loss = (fit_state.step or build_step(run))(window)
            meter.add(loss)
            if (hook := run.listeners.get("on_step_end")) is not None:  # run.emit, inlined
                hook(run=run, loss=loss)
            _step_boundary(run, meter)
            if fit_state.stopping or state.epoch != epoch:  # stopped, or the epoch ended early
                break
        if state.epoch == epoch:
            _end_epoch(run, epoch)
        run.emit("on_epoch_end", run=run, epoch=epoch)
        if config.eval_every_epoch and run.eval_data is not None:
            evaluate(run)
        _epoch_boundary(run, meter)


def _end_epoch(run: Run, epoch: int) -> None:
    """The epoch's batches ran out, or a stop came: move the data position past it if done."""
    state, length = run.state, run.fit_state.batches_per_epoch
    if state.batch_in_epoch == 0:
        # An epoch from its start gave nothing: with max_steps the loop would spin forever.
        raise _no_batch_error(run, run.fit_state.train_loader, epoch)
    if not run.fit_state.stopping or (length is not None and state.batch_in_epoch >= length):
        state.epoch, state.batch_in_epoch = epoch + 1, 0


def _finish(run: Run, meter: _Meter) -> None:
    config, state, fit_state = run.config, run.state, run.fit_state
    # the end: a last log, eval and save unless the final step just had them
    meter.log()
    evaluated = run.eval_data is None or fit_state.last_eval_step == state.step
    # not after a preemption: the grace period before SIGKILL is for saving
    if config.eval_at_end and not evaluated and not fit_state.preempted:
        evaluate(run)
    saved = run.checkpoint_format is None or fit_state.last_save_step == state.step
    if config.save_at_end and not saved:
        checkpoint.save(run)
    checkpoint.finish_pending(run)  # fit returns with every save complete
    run.emit("on_fit_end", run=run)


def _already_stopped(run: Run, reason: str) -> State:
    """``fit`` of a run resumed from a checkpoint that recorded a final stop: nothing to do."""
    state = run.state
    state.stop_reason = reason
    if run.is_main_process:
        warnings.warn(
            f"this run already stopped at step {state.step} ({reason}), as its checkpoint "
            f"{run.last_checkpoint} records, so fit() trains no further. To train on from "
            "there, call run.clear_stop() and then run.fit() (with a larger max_steps if "
            "needed); to start afresh, use a new Config.output_dir.",
            TreadleWarning,
            stacklevel=4,
        )
    return state


# ------------------------------------------------------------------ the step


def build_step(run: Run) -> Callable[[list[Any]], torch.Tensor]:
    """The optimizer step of this fit: ``step(window)`` trains on a window of micro-batches
    and returns the step's loss, on the device.

    Built from what is known when the fit starts, and again whenever the run's listeners
    change (``run.refresh_listeners`` drops it): the providers and the components' methods
    are bound once, an event nobody listens to is left out, and a base-class method that
    would do nothing here (a precision that does not scale, gradients divided by 1) is not
    called. A strategy or precision that overrides a method is always called.
    """
    state, fit_state, strategy = run.state, run.fit_state, run.strategy
    model, optimizer = run.wrapped_model, run.optimizer
    assert optimizer is not None
    step_begin, micro_begin, micro_end, before_update, after_update = (
        run.listeners.get(event) for event in _EVENTS_OF_A_STEP
    )
    training_step = run.listeners["training_step"]
    normalization = run.config.loss_normalization
    to_device = strategy.to_device
    if _bases_only(strategy, ("to_device",), ("convert_input",)):
        to_device = functools.partial(move_to_device, device=strategy.device)
    plain_update = _bases_only(strategy, ("optimizer_step",), ("optimizer_step",))
    update = None if plain_update else strategy.optimizer_step
    divides_only = _bases_only(
        strategy, ("finalize_gradients", "divide_gradients"), ("unscale_gradients",)
    )
    plain = _bases_only(strategy, ("backward",), ("scale_loss",))
    plain &= not {"on_before_backward", "on_after_backward"} & run.listeners.keys()
    fit_state.plain_backward = torch.autograd.backward if plain else None
    fit_state.plain_forward = _bases_only(strategy, ("forward_context",), ("forward_context",))

    def step(window: list[Any]) -> torch.Tensor:
        if step_begin is not None:
            step_begin(run=run)
        total: Any = None
        count: Any = 0
        last = len(window) - 1
        for index, batch in enumerate(window):
            batch = to_device(batch)
            if micro_begin is not None:
                micro_begin(run=run, batch=batch)
            if index < last:  # gradients are synchronised across ranks on the last one only
                with strategy.no_sync(model):
                    loss = training_step(run=run, model=model, batch=batch)
            else:
                loss = training_step(run=run, model=model, batch=batch)
            part, items = _loss_parts(loss, normalization)
            total = part if total is None else total + part
            count = count + items
            state.micro_step += 1
            state.samples_seen += batch_rows(batch)
            if micro_end is not None:
                micro_end(run=run, loss=loss)
        if not (divides_only and count.__class__ is int and count == 1):  # not: divide by 1
            strategy.finalize_gradients(optimizer, count)
        if before_update is not None:
            before_update(run=run, optimizer=optimizer)
        if fit_state.skip_reason is not None:  # a plugin dropped this step: run.skip_step()
            stepped, fit_state.skip_reason = False, None
        elif update is None:
            stepped = True  # the base's step, without its two calls
            optimizer.step()  # [update]: from here to [/update] the weights may be half-updated
        else:
            stepped = update(optimizer)
        if after_update is not None:
            after_update(run=run, optimizer=optimizer)
        if not stepped:
            state.skipped_steps += 1
        elif run.scheduler is not None:  # read at each step: a plugin may replace it
            run.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1  # [/update]
        state.batch_in_epoch += len(window)
        if count.__class__ is not int:
            fit_state.tokens_pending = fit_state.tokens_pending + count
        elif count == 1:
            return total  # type: ignore[no-any-return]  # dividing by 1: an op per step
        return total / count  # type: ignore[no-any-return]

    fit_state.step = step
    return step


_EVENTS_OF_A_STEP = ("on_step_begin", "on_micro_step_begin", "on_micro_step_end",
                     "on_before_optimizer_step", "on_after_optimizer_step")  # fmt: skip


#: the code of every ``step`` that ``build_step`` makes (a failure's traceback is matched to it)
_STEP_CODE = next(
    c
    for c in build_step.__code__.co_consts
    if isinstance(c, types.CodeType) and c.co_name == "step"
)


def _bases_only(strategy: Strategy, own: tuple[str, ...], precisions: tuple[str, ...]) -> bool:
    """Whether the strategy's methods ``own`` and its precision's ``precisions`` are the base
    classes', which in a step only move, call or divide by 1: what the step may do itself."""
    return _inherits(strategy, Strategy, own) and _inherits(
        strategy.precision, Precision, precisions
    )


def _inherits(component: object, base: type, names: tuple[str, ...]) -> bool:
    return all(getattr(type(component), name) is getattr(base, name) for name in names)


def _loss_parts(loss: torch.Tensor | LossSum, normalization: str) -> tuple[torch.Tensor, Any]:
    """(numerator, denominator) of the window's loss for this micro-batch, detached."""
    if isinstance(loss, LossSum):
        if normalization == "tokens":
            return loss.total.detach(), loss.count
        return (loss.total / loss.count).detach(), 1
    return loss.detach(), 1


def _step_boundary(run: Run, meter: _Meter) -> None:
    """After a step: act on the cadence and on plugins' requests, in HF's order log → eval → save."""
    config, state = run.config, run.state
    requests = _agreed_requests(run, run.fit_state.preempt_requests)
    requested = run.fit_state.stop_reason  # a plugin's reason, kept if a preemption comes with it
    if requests & PREEMPT:
        requests |= SAVE | STOP
        run.fit_state.preempted = True
        reason = run.fit_state.preempt_reason
        run.fit_state.stop_reason = reason or "preempted (a signal reached another rank)"
    if config.max_steps is not None and state.step >= config.max_steps:
        requests |= STOP
        run.fit_state.stop_reason = run.fit_state.stop_reason or "max_steps"
    log_due = requests & LOG or (config.log_every and state.step % config.log_every == 0)
    eval_due = requests & EVAL or (config.eval_every and state.step % config.eval_every == 0)
    if log_due:
        meter.log()
    if eval_due and run.eval_data is not None:
        evaluate(run)
    if log_due or eval_due:  # a plugin may have asked for a save or a stop in on_log/on_eval_end
        requests |= _agreed_requests(run)
        requested = requested or run.fit_state.stop_reason
    _stop_or_end_epoch(run, requests, requested)  # before the save, which records them
    save_due = requests & SAVE or (config.save_every and state.step % config.save_every == 0)
    if save_due and run.checkpoint_format is not None:
        checkpoint.save(run, background=config.save_async and not run.fit_state.stopping)


def _epoch_boundary(run: Run, meter: _Meter) -> None:
    """After ``on_epoch_end`` and the epoch's evaluation: act on what plugins asked for there
    (HF's epoch-end control), before the next epoch starts rather than after its first step."""
    state = run.state
    requests = _agreed_requests(run)
    if requests & LOG:
        meter.log()
    if requests & EVAL and run.eval_data is not None:
        evaluate(run)
        requests |= _agreed_requests(run)
    _stop_or_end_epoch(run, requests & ~END_EPOCH, run.fit_state.stop_reason)  # the epoch has ended
    saved = run.checkpoint_format is None or run.fit_state.last_save_step == state.step
    if requests & SAVE and not saved:
        checkpoint.save(run, background=run.config.save_async and not run.fit_state.stopping)


def _agreed_requests(run: Run, also: int = 0) -> int:
    """The requests pending on any rank (with ``also``), agreed by every rank; taken, so that
    each is acted on once."""
    requests = run.strategy.agree(run.fit_state.requests | also)
    run.fit_state.requests = 0
    return requests


def _stop_or_end_epoch(run: Run, requests: int, requested: str | None) -> None:
    state = run.state
    if requests & STOP:
        run.fit_state.stopping = True
        state.stop_reason = run.fit_state.stop_reason or "stop requested on another rank"
        if requests & FINAL:  # part of the run's state: a checkpoint of this step records it
            run.fit_state.final_stop = requested or "stop requested on another rank"
    elif requests & END_EPOCH:  # the rest of this epoch is skipped; a checkpoint records that
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def _limit_reached(run: Run, max_epochs: int | None) -> bool:
    state, config = run.state, run.config
    if config.max_steps is not None and state.step >= config.max_steps:
        state.stop_reason = state.stop_reason or "max_steps"
        return True
    if max_epochs is not None and state.epoch >= max_epochs:
        state.stop_reason = "max_epochs"
        return True
    return False


def _plan(run: Run, batches_per_epoch: int | None) -> tuple[int | None, int | None]:
    """(max_epochs, total optimizer steps): both totals over the run's life."""
    config = run.config
    max_epochs = config.max_epochs or (None if config.max_steps else 1)
    if max_epochs is not None and batches_per_epoch is None and config.max_steps is None:
        raise ConfigError(
            "train_data has no length, so Config.max_steps must be set (epochs cannot be counted)"
        )
    candidates = [config.max_steps] if config.max_steps is not None else []
    if max_epochs is not None and batches_per_epoch is not None:
        candidates.append(max_epochs * math.ceil(batches_per_epoch / config.grad_accum_steps))
    return max_epochs, min(candidates) if candidates else None


def _epoch_batches(run: Run, loader: Iterable[Any]) -> Iterator[Any]:
    """The batches of the current epoch not yet consumed (the position survives resume)."""
    state = run.state
    sampler = getattr(loader, "sampler", None)
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(state.epoch)
    done = state.batch_in_epoch
    if not done:
        return iter(loader)
    batch_size = getattr(loader, "batch_size", None)
    # A DataLoader draws a seed from torch's generator whenever it is iterated; the run this
    # one continues did that at the epoch's start, before its checkpoint's RNG state was taken.
    with checkpoint.rng_preserved(run.device):
        if isinstance(sampler, ResumableSampler) and batch_size:
            sampler.skip(done * batch_size)  # jump: the skipped samples are never read
            return iter(loader)
        return islice(iter(loader), done, None)


def _windows(batches: Iterator[Any], size: int) -> Iterator[list[Any]]:
    if size == 1:  # the common case, without an islice per step
        for batch in batches:
            yield [batch]
        return
    window = list(islice(batches, size))
    while window:
        yield window
        window = list(islice(batches, size))


# ------------------------------------------------------------------ data that cannot train


def _check_iterable(run: Run, loader: Any) -> None:
    """Refuse training data that is no sequence of batches (once, at the start of ``fit``)."""
    if isinstance(loader, str | bytes | Mapping) or not (
        hasattr(loader, "__iter__") or hasattr(loader, "__getitem__")
    ):
        kind = "one batch, not a collection of them; " if isinstance(loader, Mapping) else ""
        raise ConfigError(
            f"train_data is {describe_data(run.train_data)}, which is {kind}not an iterable of "
            "batches. Pass a DataLoader, a map-style Dataset (with Config.batch_size) or a list "
            "of batches."
        )


def _check_accumulation(grad_accum_steps: int, batches_per_epoch: int | None) -> None:
    # A window never spans two epochs, so each step would average fewer micro-batches than
    # asked: the effective batch size could never be what the config says.
    if batches_per_epoch is not None and grad_accum_steps > batches_per_epoch:
        raise ConfigError(
            f"Config.grad_accum_steps = {grad_accum_steps} is larger than the "
            f"{batches_per_epoch} batches of one epoch of train_data (per process); every "
            f"optimizer step would average {batches_per_epoch} micro-batches, not "
            f"{grad_accum_steps}, since a step never spans two epochs. Set grad_accum_steps "
            f"to at most {batches_per_epoch}, or use smaller batches."
        )


def _no_batch_error(run: Run, loader: Any, epoch: int) -> TreadleError:
    state, data = run.state, run.train_data
    if isinstance(data, Iterator) and epoch > 0:
        hint = (
            f"A generator or iterator can be iterated once only: it ran out in epoch "
            f"{epoch - 1}. Pass a re-iterable (a list, a DataLoader, a Dataset), or set "
            f"Config.max_steps <= {state.step}."
        )
    elif isinstance(loader, DataLoader) and loader.drop_last and length_of(loader.dataset):
        hint = (
            f"drop_last=True drops the only batch, which is incomplete ({length_of(loader.dataset)} "
            f"rows, batch_size={loader.batch_size}): use drop_last=False or a smaller batch size."
        )
    else:
        hint = "It is empty: pass data with at least one batch."
    loaded = "" if loader is data else f" (loaded as {describe_data(loader)})"
    return TreadleError(
        f"train_data yielded no batch in epoch {epoch} (at step {state.step}): it is "
        f"{describe_data(data)}{loaded}. {hint}"
    )


# ------------------------------------------------------------------ when a run fails


def _save_after_failure(run: Run, exc: Exception, first_step: int) -> None:
    """``exc`` escapes ``fit``: write an emergency checkpoint of the last completed step when that
    is safe, and say on ``exc`` what was done. The rule is in docs/checkpoints.md."""
    state = run.state
    # nothing to save with, nothing trained since this fit began, or saved already
    if run.checkpoint_format is None or state.step in (first_step, run.fit_state.last_save_step):
        return
    existing = run.checkpoint_store.existing(run, state.step)
    unsafe = _unsafe_to_save(run, exc) or (f"{existing} exists and is kept" if existing else None)
    if unsafe:
        exc.add_note(f"treadle: no emergency checkpoint was written: {unsafe}")
        return
    assert run.optimizer is not None
    run.optimizer.zero_grad(set_to_none=True)  # the failed step's partial gradients
    run.fit_state.emergency = f"{type(exc).__name__}: {exc}"
    try:
        saved = checkpoint.save(run)
    except Exception as failure:  # the original error matters more
        exc.add_note(
            f"treadle: writing an emergency checkpoint of step {state.step} failed too: "
            f"{type(failure).__name__}: {failure}"
        )
        return
    finally:
        run.fit_state.emergency = None
    exc.add_note(
        f"treadle: wrote an emergency checkpoint of step {state.step} (the last completed "
        f"step) to {saved}; Config.resume='auto' continues from it"
    )


def _unsafe_to_save(run: Run, exc: Exception) -> str | None:
    """Why the state after ``exc`` must not be saved, or None when it is the state of the last
    completed step boundary (its weights whole)."""
    if run.strategy.world_size != 1:
        return "with several processes the others may be inside a collective"
    traceback = exc.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        code = frame.f_code
        if code in (checkpoint.save.__code__, checkpoint.finish_pending.__code__):
            return "the failure was in writing a checkpoint"
        if code is _STEP_CODE:
            lines = _update_lines(code)
            if lines is None or traceback.tb_lineno in lines:
                return "it happened in the optimizer step, so the weights may be half-updated"
            if not defaults.alone(run, "training_step"):
                return "a plugin's training_step may have updated the weights in part"
        elif code.co_name in ("step", "zero_grad") and isinstance(
            frame.f_locals.get("self"), torch.optim.Optimizer | torch.optim.lr_scheduler.LRScheduler
        ):
            return "it happened in the optimizer step, so the weights may be half-updated"
        traceback = traceback.tb_next
    return None


@functools.cache  # read from the source once, and only after a failure
def _update_lines(function: Any) -> frozenset[int] | None:
    """The lines of ``function`` from the one marked ``[update]`` to ``[/update]``: a failure
    there may leave the weights half-updated. None if its source cannot be read."""
    try:
        source, first = inspect.getsourcelines(function)
    except (OSError, TypeError):
        return None
    marks = [
        first + i for i, line in enumerate(source) if "# [update]" in line or "# [/update]" in line
    ]
    if len(marks) != 2:
        return None
    return frozenset(range(marks[0], marks[1] + 1))


class _Meter:
    """Training loss and throughput since the last log, kept on the device until logged."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._reset()

    def _reset(self) -> None:
        self.loss: torch.Tensor | None = None
        self.steps = 0
        self.start = time.perf_counter()
        self.samples = self.run.state.samples_seen

    def add(self, loss: torch.Tensor) -> None:
        # One running sum, not a list of the steps' losses: a list costs no tensor op per step
        # but keeps a small allocation alive per step, which fragments the heap (+40 MB RSS
        # on the BERT benchmark).
        if self.loss is None:
            self.loss = loss.detach().clone()
        else:
            self.loss.add_(loss)  # the step's loss is already detached
        self.steps += 1

    def log(self) -> None:
        """Log the steps since the last log: ``loss`` (their mean, over every rank), ``lr``,
        ``step_time_s`` (this rank's clock) and ``samples_per_s`` (the samples of every rank
        over that time: the global rate)."""
        if self.loss is None:
            return
        run, state = self.run, self.run.state
        run.strategy.synchronize()  # queued device work belongs to the time measured
        elapsed = time.perf_counter() - self.start
        run.fold_tokens()
        assert run.optimizer is not None
        # The loss's mean and the samples' sum over ranks, in one reduction per log and none
        # per step (identity in one process). At least float32, in which sample counts are
        # exact up to 2**24 per log; a float64 loss stays float64.
        mean = self.loss / self.steps
        dtype = torch.promote_types(mean.dtype, torch.float32)
        samples = state.samples_seen - self.samples
        both = torch.stack((mean.to(dtype), mean.new_full((), samples, dtype=dtype)))
        both = run.strategy.all_reduce(both, "sum")
        both[0] /= run.strategy.world_size
        loss, samples_all = both.tolist()
        metrics = {
            "loss": loss,
            "lr": float(run.optimizer.param_groups[0]["lr"]),
            "step_time_s": elapsed / self.steps,  # this rank's clock
            "samples_per_s": samples_all / max(elapsed, 1e-9),  # every rank's samples
        }
        self._reset()
        run.log(metrics)
