"""The loop: ``fit``, ``evaluate`` and ``predict``. It emits hooks and calls components through
their interfaces; it names no backend. The pseudocode it follows is in ``treadle.hookspecs``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch

from treadle import checkpoint
from treadle.data import ResumableSampler
from treadle.defaults import batch_rows
from treadle.errors import ConfigError
from treadle.state import LossSum, State

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["evaluate", "fit", "predict"]

# Requests from plugins, kept as bits so that ranks can agree on them with one reduction.
STOP, SAVE, EVAL, LOG = 1, 2, 4, 8


def fit(run: Run) -> State:
    config, state = run.config, run.state
    run.setup()
    loader = run.provide("make_train_loader", run=run, data=run.train_data)
    batches_per_epoch = _length(loader)
    max_epochs, run.total_steps = _plan(run, batches_per_epoch)
    run.setup_optimizer()
    if config.resume is not None and not run._resumed:
        checkpoint.resume(run)
    run._refresh_listeners()
    run._batches_per_epoch = batches_per_epoch
    run._stopping = False
    model, optimizer = run.wrapped_model, run.optimizer
    assert optimizer is not None
    model.train()
    meter = _Meter(run)
    run.emit("on_fit_begin", run=run)
    while not run._stopping and not _limit_reached(run, max_epochs):
        epoch = state.epoch
        run.emit("on_epoch_begin", run=run, epoch=epoch)
        for window in _windows(_epoch_batches(run, loader), config.grad_accum_steps):
            loss = _train_step(run, model, optimizer, window)
            meter.add(loss)
            run.emit("on_step_end", run=run, loss=loss)
            _step_boundary(run, meter)
            if run._stopping:
                break
        exhausted = not run._stopping or (
            batches_per_epoch is not None and state.batch_in_epoch >= batches_per_epoch
        )
        if exhausted:
            state.epoch, state.batch_in_epoch = epoch + 1, 0
        run.emit("on_epoch_end", run=run, epoch=epoch)
        if config.eval_every_epoch and run.eval_data is not None:
            evaluate(run)
    # the end: a last log, eval and save unless the final step just had them
    meter.log()
    if config.eval_at_end and run.eval_data is not None and run._last_eval_step != state.step:
        evaluate(run)
    if (
        config.save_at_end
        and run.checkpoint_format is not None
        and run._last_save_step != state.step
    ):
        checkpoint.save(run)
    run.emit("on_fit_end", run=run)
    return state


def _train_step(
    run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer, window: list[Any]
) -> torch.Tensor:
    """One optimizer step over a window of micro-batches; returns the step's loss on device."""
    state, strategy = run.state, run.strategy
    normalization = run.config.loss_normalization
    run.emit("on_step_begin", run=run)
    total: torch.Tensor | None = None
    count: torch.Tensor | int = 0
    last = len(window) - 1
    for index, batch in enumerate(window):
        batch = strategy.to_device(batch)
        run.emit("on_micro_step_begin", run=run, batch=batch)
        # gradients are synchronised across ranks only on the window's last micro-batch
        with strategy.no_sync(model) if index < last else contextlib.nullcontext():
            loss = run.provide("training_step", run=run, model=model, batch=batch)
        part, items = _loss_parts(loss, normalization)
        total = part if total is None else total + part
        count = count + items
        state.micro_step += 1
        state.samples_seen += batch_rows(batch)
        run.emit("on_micro_step_end", run=run, loss=loss)
    assert total is not None
    strategy.finalize_gradients(optimizer, count)
    run.emit("on_before_optimizer_step", run=run, optimizer=optimizer)
    stepped = strategy.optimizer_step(optimizer)
    run.emit("on_after_optimizer_step", run=run, optimizer=optimizer)
    if not stepped:
        state.skipped_steps += 1
    elif run.scheduler is not None:
        run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.batch_in_epoch += len(window)
    if isinstance(count, torch.Tensor):
        run._tokens_pending = run._tokens_pending + count
    return total / count


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
    requests = run.strategy.agree(run._requests)
    run._requests = 0
    if config.max_steps is not None and state.step >= config.max_steps:
        requests |= STOP
        run._stop_reason = run._stop_reason or "max_steps"
    if requests & LOG or (config.log_every and state.step % config.log_every == 0):
        meter.log()
    if (requests & EVAL or (config.eval_every and state.step % config.eval_every == 0)) and (
        run.eval_data is not None
    ):
        evaluate(run)
    if (requests & SAVE or (config.save_every and state.step % config.save_every == 0)) and (
        run.checkpoint_format is not None
    ):
        checkpoint.save(run)
    if requests & STOP:
        run._stopping = True
        state.stop_reason = run._stop_reason or "stop requested on another rank"


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
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(state.epoch)
    done = state.batch_in_epoch
    batch_size = getattr(loader, "batch_size", None)
    if done and isinstance(sampler, ResumableSampler) and batch_size:
        sampler.skip(done * batch_size)  # jump: the skipped samples are never read
        return iter(loader)
    return islice(iter(loader), done, None)


def _windows(batches: Iterator[Any], size: int) -> Iterator[list[Any]]:
    window = list(islice(batches, size))
    while window:
        yield window
        window = list(islice(batches, size))


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


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
        if self.loss is None:
            self.loss = loss.detach().clone()
        else:
            self.loss.add_(loss.detach())
        self.steps += 1

    def log(self) -> None:
        if self.loss is None:
            return
        run, state = self.run, self.run.state
        elapsed = time.perf_counter() - self.start
        run.fold_tokens()
        assert run.optimizer is not None
        metrics = {
            "loss": float((self.loss / self.steps).item()),
            "lr": float(run.optimizer.param_groups[0]["lr"]),
            "step_time_s": elapsed / self.steps,
            "samples_per_s": (state.samples_seen - self.samples) / max(elapsed, 1e-9),
        }
        self._reset()
        run.log(metrics)


def evaluate(run: Run, data: Any = None) -> dict[str, float]:
    run.setup()
    data = run.eval_data if data is None else data
    if data is None:
        raise ConfigError("no evaluation data: pass eval_data to treadle.Run or to evaluate()")
    named = dict(data) if isinstance(data, Mapping) else {"eval": data}
    model = run.wrapped_model
    was_training = model.training
    model.eval()
    run._refresh_listeners()
    metrics: dict[str, float] = {}
    with torch.no_grad():
        for name, dataset in named.items():
            metrics.update(_evaluate_one(run, model, name, dataset))
    model.train(was_training)
    run._last_eval_step = run.state.step
    run.log(metrics)
    return metrics


def _evaluate_one(run: Run, model: torch.nn.Module, name: str, data: Any) -> dict[str, float]:
    strategy = run.strategy
    loader = run.provide("make_eval_loader", run=run, data=data)
    run._eval_lengths[name] = _length(loader)
    run.emit("on_eval_begin", run=run, name=name)
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    count = torch.zeros((), dtype=torch.float64, device=run.device)
    for batch in loader:
        batch = strategy.to_device(batch)
        outputs = run.provide("eval_step", run=run, model=model, batch=batch)
        items = outputs.get("count", 1)
        total += outputs["loss"].detach().double() * items
        count += items
        run.emit("on_eval_step_end", run=run, name=name, batch=batch, outputs=outputs)
    total, count = strategy.all_reduce(total, "sum"), strategy.all_reduce(count, "sum")
    metrics = {f"{name}/loss": float((total / count.clamp_min(1)).item())}
    run.emit("on_eval_end", run=run, name=name, metrics=metrics)
    return metrics


def predict(run: Run, data: Any) -> list[Any]:
    run.setup()
    loader = run.provide("make_eval_loader", run=run, data=data)
    model = run.wrapped_model
    was_training = model.training
    model.eval()
    run._refresh_listeners()
    predictions: list[Any] = []
    run.emit("on_predict_begin", run=run)
    with torch.no_grad():
        for batch in loader:
            batch = run.strategy.to_device(batch)
            outputs = run.provide("predict_step", run=run, model=model, batch=batch)
            predictions.append(outputs)
            run.emit("on_predict_step_end", run=run, batch=batch, outputs=outputs)
    run.emit("on_predict_end", run=run, predictions=predictions)
    model.train(was_training)
    return predictions
