"""``auto-batch-size``: on out-of-memory at the start of ``fit``, split each micro-batch in
smaller chunks, keeping the global batch.

The plugin provides ``training_step``. When the fit's first micro-batch runs out of memory
(``torch.OutOfMemoryError``, or a ``RuntimeError`` saying "out of memory" /
"can't allocate memory"), it zeroes the partial gradients, restores the random number
generators and the model's buffers (batch-norm statistics) to what they were before that
forward, halves the micro-batch size and tries again, down to ``min_micro_batch_size``. From
then on every micro-batch is split into chunks of at most that many rows, and each chunk is
back-propagated with its loss scaled so that the summed gradient is the whole micro-batch's:
for a mean loss, chunk loss * chunk rows / micro-batch rows; under
``Config.loss_normalization="tokens"``, the ``LossSum`` totals simply add. The step returns the
same loss the kernel would have seen, so logs, ``max_steps``, the schedule and
``Config.batch_size`` are unchanged: the effective accumulation becomes
``grad_accum_steps * chunks``. A ``TreadleWarning`` names the new micro-batch size and the
effective accumulation. The chunk size is kept in checkpoints, so a resumed run splits alike
from its first step.

Retrying is safe only at the fit's first micro-batch: later, earlier micro-batches of the
window have accumulated gradients that a partial backward has corrupted, so an out-of-memory
error after the first micro-batch is re-raised, with a note saying so (lower
``Config.batch_size``, or put the longest batch first with ``length-grouped-sampler``).

Refused (``ConfigError``) where splitting is unsafe: several processes (an out-of-memory error
on one rank cannot be retried while the others wait in a collective); strategies whose engine
owns backward (they override ``Strategy.backward``, e.g. DeepSpeed, Accelerate: the engine
counts each backward as a micro-step); another plugin's ``training_step``, which cannot be
split. ``loss_normalization="mean"`` with a ``LossSum`` loss cannot be split exactly (the
micro-batch's count is known only after every chunk): an error at the first split says so.

Options:

* ``min_micro_batch_size`` (``int``, default 1): the smallest micro-batch to try; an
  out-of-memory error at that size is raised with a message saying so.

Batches are split along the first dimension of every tensor whose first dimension is the
batch's row count (``treadle.defaults.batch_rows``); other values are passed to every chunk.
A mean loss over tokens (a causal LM's) weighs each chunk by rows, as accumulation weighs
micro-batches: use ``loss_normalization="tokens"`` for exact per-token weighting.
Only forward and backward are retried: an out-of-memory error in the optimizer step (its state
is allocated at the first step) is raised.

HF Trainer: ``TrainingArguments(auto_find_batch_size=True)`` (which restarts the whole loop with
half the batch). Lightning: ``Tuner.scale_batch_size`` (a search before training).

Example::

    run = treadle.Run(model, train_data=dataset, config=treadle.Config(batch_size=64),
                      plugins=["auto-batch-size"])
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from treadle.components import Strategy
from treadle.defaults import PLUGIN_NAME, batch_rows
from treadle.errors import ConfigError, TreadleError, TreadleWarning
from treadle.hookspecs import hookimpl
from treadle.plugins.defaults import backward_value
from treadle.state import LossSum

if TYPE_CHECKING:
    from collections.abc import Iterator

    from treadle.run import Run

__all__ = ["AutoBatchSize", "is_out_of_memory", "split_batch"]

_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cudnn_status_not_supported")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device running out of memory (as accelerate's
    ``should_reduce_batch_size`` tells it)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def split_batch(batch: Any, rows: int, size: int) -> list[Any]:
    """``batch`` cut along its first dimension into chunks of at most ``size`` rows: every
    tensor whose first dimension is ``rows`` is cut; other values go to every chunk."""
    count = -(-rows // size)
    bounds = [min(i * size, rows) for i in range(count + 1)]

    def cut(value: Any, index: int) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
            return value[bounds[index] : bounds[index + 1]]
        if isinstance(value, Mapping):
            return type(value)({k: cut(v, index) for k, v in value.items()})  # type: ignore[call-arg]
        if isinstance(value, tuple | list):
            return type(value)(cut(v, index) for v in value)
        return value

    return [cut(batch, index) for index in range(count)]


class AutoBatchSize:
    """Split micro-batches that run out of memory at the start of fit, keeping the global batch.

    Args:
        min_micro_batch_size: the smallest micro-batch to try (>= 1).
    """

    name: ClassVar[str] = "auto-batch-size"

    def __init__(self, min_micro_batch_size: int = 1) -> None:
        if (
            isinstance(min_micro_batch_size, bool)
            or not isinstance(min_micro_batch_size, int)
            or min_micro_batch_size < 1
        ):
            raise ConfigError(
                f"auto-batch-size option min_micro_batch_size = {min_micro_batch_size!r} is not "
                "allowed: expected an integer >= 1"
            )
        self.min_micro_batch_size = min_micro_batch_size
        #: rows per chunk once a split was needed; None: micro-batches are not split
        self.micro_batch_size: int | None = None
        self._first_of_fit = False

    def __repr__(self) -> str:
        return f"AutoBatchSize(min_micro_batch_size={self.min_micro_batch_size})"

    # ------------------------------------------------------------------ checks

    @hookimpl
    def on_init_end(self, run: Run) -> None:
        self._check(run)

    @hookimpl
    def on_fit_begin(self, run: Run) -> None:
        self._check(run)  # the world size is known once the strategy is set up
        self._first_of_fit = True

    def _check(self, run: Run) -> None:
        strategy = run.strategy
        if strategy.world_size > 1:
            raise ConfigError(
                f"auto-batch-size cannot run with {strategy.world_size} processes: an "
                "out-of-memory error on one rank cannot be retried while the others wait in a "
                "collective. Set Config.batch_size (and grad_accum_steps) by hand, or remove "
                "the plugin."
            )
        if type(strategy).backward is not Strategy.backward:
            raise ConfigError(
                f"auto-batch-size cannot split micro-batches under strategy {strategy.name!r}: "
                "its engine owns backward and counts every backward as a micro-step. Lower "
                "the engine's micro-batch size instead, or remove the plugin."
            )
        others = [
            impl.plugin_name
            for impl in run.plugin_manager.hook.training_step.get_hookimpls()
            if impl.plugin is not self and impl.plugin_name != PLUGIN_NAME
        ]
        if others:
            raise ConfigError(
                f"auto-batch-size provides training_step, and so does {', '.join(others)}; only "
                "one can run, and a custom step cannot be split. Remove one of them."
            )

    # ------------------------------------------------------------------ the step

    @hookimpl
    def training_step(self, run: Run, model: torch.nn.Module, batch: Any) -> Any:
        if not self._first_of_fit:
            try:
                return self._step(run, model, batch, self.micro_batch_size)
            except Exception as exc:
                if is_out_of_memory(exc):
                    exc.add_note(
                        f"auto-batch-size: ran out of memory at step {run.state.step}, after "
                        "the fit's first micro-batch; retrying is unsafe then (earlier "
                        "micro-batches' gradients are mixed with a partial backward's). Lower "
                        "Config.batch_size, or put the longest batch first "
                        "(length-grouped-sampler)."
                    )
                raise
        saved = _Snapshot(run, model)
        size = self.micro_batch_size
        while True:
            try:
                loss = self._step(run, model, batch, size)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                failure: BaseException | None = exc
            else:
                self._first_of_fit = False
                return loss
            # outside the except block: the traceback's frames hold the failed step's tensors
            rows = batch_rows(batch)
            current = size if size is not None else rows
            if current <= self.min_micro_batch_size:
                raise TreadleError(
                    f"auto-batch-size: out of memory with micro-batches of {current} row(s) "
                    f"(the least allowed: min_micro_batch_size={self.min_micro_batch_size}); "
                    "the model does not fit at any batch size this plugin can try. Use a "
                    "smaller model, a lower precision, activation checkpointing or a sharding "
                    "strategy."
                ) from failure
            failure = None
            saved.restore(run, model)
            size = max(-(-current // 2), self.min_micro_batch_size)
            self.micro_batch_size = size
            chunks = -(-rows // size)
            accumulation = run.config.grad_accum_steps * chunks
            message = (
                f"auto-batch-size: out of memory with micro-batches of {current} rows; "
                f"splitting each micro-batch of {rows} into {chunks} chunks of at most {size} "
                f"rows (effective gradient accumulation {accumulation}, global batch unchanged)"
            )
            warnings.warn(message, TreadleWarning, stacklevel=1)

    def _step(self, run: Run, model: torch.nn.Module, batch: Any, size: int | None) -> Any:
        rows = batch_rows(batch)
        if size is None or size >= rows:
            return self._forward_backward(run, model, batch, 1.0)
        chunks = split_batch(batch, rows, size)
        losses = []
        for index, chunk in enumerate(chunks):
            weight = batch_rows(chunk) / rows
            if index < len(chunks) - 1:  # gradients are synchronised on the last chunk only
                with run.strategy.no_sync(model):
                    losses.append(self._forward_backward(run, model, chunk, weight))
            else:
                losses.append(self._forward_backward(run, model, chunk, weight))
        if isinstance(losses[0], LossSum):  # tokens mode: the parts add up
            total, count = losses[0].total.detach(), losses[0].count
            for part in losses[1:]:
                total, count = total + part.total.detach(), count + part.count
            return LossSum(total, count)
        # the micro-batch's mean: the chunks' means weighted by their rows
        mean = losses[0].detach() * (batch_rows(chunks[0]) / rows)
        for chunk, loss in zip(chunks[1:], losses[1:], strict=True):
            mean = mean + loss.detach() * (batch_rows(chunk) / rows)
        return mean

    @staticmethod
    def _forward_backward(run: Run, model: torch.nn.Module, batch: Any, weight: float) -> Any:
        normalization = run.config.loss_normalization
        with run.strategy.forward_context():
            loss = run.provide("compute_loss", run=run, model=model, batch=batch)
        if weight != 1.0 and isinstance(loss, LossSum) and normalization == "mean":
            raise TreadleError(
                "auto-batch-size cannot split this micro-batch exactly: compute_loss returns a "
                "LossSum under loss_normalization='mean', whose divisor (the whole "
                "micro-batch's count) is known only after every chunk. Use "
                "Config(loss_normalization='tokens') or return a mean loss."
            )
        value = backward_value(loss, normalization)
        if normalization == "mean":
            value = value * weight
        run.backward(value)
        return loss

    # ------------------------------------------------------------------ checkpoints

    @hookimpl
    def on_save_checkpoint(self, plugin_state: MutableMapping[str, Any]) -> None:
        plugin_state[self.name] = {"micro_batch_size": self.micro_batch_size}

    @hookimpl
    def on_load_checkpoint(self, plugin_state: Mapping[str, Any]) -> None:
        state = plugin_state.get(self.name)
        if state is not None:
            self.micro_batch_size = state.get("micro_batch_size")


class _Snapshot:
    """What a failed forward/backward may have changed, taken before the fit's first one: the
    random generators (dropout) and the model's buffers (batch-norm statistics)."""

    def __init__(self, run: Run, model: torch.nn.Module) -> None:
        self.cpu_rng = torch.get_rng_state()
        device = run.device
        self.device_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.buffers = {name: b.detach().clone() for name, b in _buffers(model)}

    def restore(self, run: Run, model: torch.nn.Module) -> None:
        assert run.optimizer is not None
        run.optimizer.zero_grad(set_to_none=True)
        for parameter in model.parameters():  # parameters the optimizer does not hold too
            parameter.grad = None
        gc.collect()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        torch.set_rng_state(self.cpu_rng)
        if self.device_rng is not None:
            torch.cuda.set_rng_state(self.device_rng, run.device)
        with torch.no_grad():
            for name, buffer in _buffers(model):
                buffer.copy_(self.buffers[name])


def _buffers(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    return ((name, b) for name, b in model.named_buffers() if b is not None)
