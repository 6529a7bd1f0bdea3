"""``throughput``: samples, tokens and FLOPs per second, and model FLOPs utilisation.

Adds to every training log (the record with ``"loss"``), measured over the steps since the
previous one:

* ``throughput/step_time_s``: wall time per optimizer step;
* ``throughput/samples_per_s`` and ``throughput/tokens_per_s``: over all processes (this
  rank's count times the world size: distributed samplers give every rank the same share);
* ``throughput/flops_per_s``: model FLOPs per second on this device, when the FLOPs per token
  are known (``flops_per_token``) or estimated as ``6 * trainable parameters`` (forward and
  backward of a dense model, the estimate of Kaplan et al. 2020; attention's own FLOPs are
  not counted, so long sequences are under-estimated);
* ``throughput/mfu``: ``flops_per_s / peak_flops``, when the device's peak is stated (there is
  no table of devices: the peak depends on the dtype, sparsity and clocks you run at, e.g.
  989e12 for an H100 SXM in dense bf16).

Tokens are counted, in order of preference, by ``count_tokens(batch)`` (called on every
micro-batch: read shapes or sum a mask, and return an int or a device tensor; the plugin only
reads it at log time), by the kernel's scored-token count (``loss_normalization="tokens"``),
or as ``tokens_per_sample`` per sample. Without any of these, FLOPs count one token per
sample (right for models that see one vector per sample) and ``tokens_per_s`` is not logged.

Time spent evaluating and saving checkpoints between two logs is not counted. The clock is
read at each log, right after the kernel has read the loss (a host-device synchronisation),
so queued device work is included. Per step the plugin does nothing, unless ``count_tokens``
is given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from treadle.errors import ConfigError
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["Throughput", "estimate_flops_per_token"]


def estimate_flops_per_token(model: torch.nn.Module) -> float:
    """``6 * N``, N the trainable parameters: training FLOPs per token of a dense model."""
    return 6.0 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def _positive(option: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(
            f"throughput option {option} = {value!r} is not allowed: expected a number > 0 or None"
        )
    if not math.isfinite(value):
        raise ConfigError(f"throughput option {option} = {value!r} is not allowed: not finite")
    return float(value)


class _TokenCounter:
    """Registered only when ``count_tokens`` is given, so that otherwise no step pays for it."""

    name = "throughput-tokens"

    def __init__(self, count: Callable[[Any], int | torch.Tensor]) -> None:
        self.count = count
        self.tokens: int | torch.Tensor = 0

    @hookimpl
    def on_micro_step_begin(self, batch: Any) -> None:
        self.tokens = self.tokens + self.count(batch)

    def take(self) -> int:
        tokens, self.tokens = self.tokens, 0
        return int(tokens.item()) if isinstance(tokens, torch.Tensor) else int(tokens)


class Throughput:
    """Samples, tokens and FLOPs per second and MFU, added to every training log.

    Args:
        flops_per_token: model FLOPs per token for one training step (forward and backward);
            None: ``6 * trainable parameters`` if ``estimate_flops``, else no FLOPs logged.
        peak_flops: the device's peak FLOP/s for the dtype you train in; MFU is logged only
            when it is given.
        tokens_per_sample: tokens in every sample (a fixed sequence length).
        count_tokens: ``count_tokens(batch)`` → tokens in a micro-batch (an int or a tensor);
            an import path is accepted.
        estimate_flops: estimate ``flops_per_token`` when it is not given.
    """

    name: ClassVar[str] = "throughput"

    def __init__(
        self,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        tokens_per_sample: int | None = None,
        count_tokens: Callable[[Any], int | torch.Tensor] | str | None = None,
        estimate_flops: bool = True,
    ) -> None:
        self.flops_per_token = _positive("flops_per_token", flops_per_token)
        self.peak_flops = _positive("peak_flops", peak_flops)
        if tokens_per_sample is not None and (
            isinstance(tokens_per_sample, bool)
            or not isinstance(tokens_per_sample, int)
            or tokens_per_sample < 1
        ):
            raise ConfigError(
                f"throughput option tokens_per_sample = {tokens_per_sample!r} is not allowed: "
                "expected an integer >= 1 or None"
            )
        self.tokens_per_sample = tokens_per_sample
        if isinstance(count_tokens, str):
            from treadle.registry import import_path

            count_tokens = import_path(count_tokens)
        if count_tokens is not None and not callable(count_tokens):
            raise ConfigError(
                f"throughput option count_tokens = {count_tokens!r} is not allowed: expected a "
                "function batch -> number of tokens, or None"
            )
        if not isinstance(estimate_flops, bool):
            raise ConfigError(
                f"throughput option estimate_flops = {estimate_flops!r} is not allowed: "
                "expected True or False"
            )
        self.estimate_flops = estimate_flops
        self._counter = None if count_tokens is None else _TokenCounter(count_tokens)
        self._counter_registered = False
        self._fitting = False
        self._paused_at: float | None = None
        self._start = 0.0
        self._paused = 0.0
        self._step = self._samples = self._tokens = 0
        #: the FLOPs per token in use (given or estimated at fit start).
        self.flops_in_use: float | None = self.flops_per_token

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_fit_begin(self, run: Run) -> None:
        if self._counter is not None and not self._counter_registered:
            run.add_plugin(self._counter)
            self._counter_registered = True
        if self.flops_per_token is None and self.estimate_flops:
            self.flops_in_use = estimate_flops_per_token(run.model)
        self._fitting = True
        self._restart(run)

    @hookimpl
    def on_fit_end(self) -> None:
        self._fitting = False

    @hookimpl
    def on_exception(self) -> None:
        self._fitting = False

    @hookimpl
    def on_eval_begin(self) -> None:
        self._pause()

    @hookimpl
    def on_eval_end(self) -> None:
        self._resume()

    @hookimpl
    def on_save_checkpoint(self) -> None:
        self._pause()

    @hookimpl
    def on_save_end(self) -> None:
        self._resume()

    @hookimpl(wrapper=True)
    def on_log(self, run: Run, metrics: Mapping[str, float]) -> Generator[None, Any, Any]:
        if self._fitting and "loss" in metrics and isinstance(metrics, MutableMapping):
            metrics.update(self.measure(run))
        return (yield)

    # ------------------------------------------------------------------ measuring

    def measure(self, run: Run) -> dict[str, float]:
        """The rates since the previous measurement; starts the next window."""
        state = run.state
        elapsed = time.perf_counter() - self._start - self._paused
        steps = state.step - self._step
        samples = state.samples_seen - self._samples
        tokens = self._count_tokens(run, samples)
        self._restart(run)
        if steps <= 0 or elapsed <= 0:
            return {}
        world = run.strategy.world_size
        values = {
            "throughput/step_time_s": elapsed / steps,
            "throughput/samples_per_s": samples * world / elapsed,
        }
        if tokens is not None:
            values["throughput/tokens_per_s"] = tokens * world / elapsed
        if self.flops_in_use is not None:
            work = tokens if tokens is not None else samples
            flops_per_s = work * self.flops_in_use / elapsed
            values["throughput/flops_per_s"] = flops_per_s
            if self.peak_flops is not None:
                values["throughput/mfu"] = flops_per_s / self.peak_flops
        return values

    def _count_tokens(self, run: Run, samples: int) -> int | None:
        if self._counter is not None:
            return self._counter.take()
        scored = run.state.tokens_seen - self._tokens
        if scored > 0:
            return scored
        if self.tokens_per_sample is not None:
            return samples * self.tokens_per_sample
        return None

    def _restart(self, run: Run) -> None:
        state = run.state
        self._start, self._paused, self._paused_at = time.perf_counter(), 0.0, None
        self._step, self._samples, self._tokens = state.step, state.samples_seen, state.tokens_seen
        if self._counter is not None:
            self._counter.tokens = 0

    def _pause(self) -> None:
        if self._fitting and self._paused_at is None:
            self._paused_at = time.perf_counter()

    def _resume(self) -> None:
        if self._paused_at is not None:
            self._paused += time.perf_counter() - self._paused_at
            self._paused_at = None
