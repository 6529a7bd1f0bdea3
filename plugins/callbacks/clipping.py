"""``grad-clip``: clip gradients by global norm or by value, and log the norm as ``grad_norm``.

Clipping runs in ``on_before_optimizer_step``, where gradients are final: unscaled by the
precision plugin, divided by the accumulation window and synchronised across ranks. The norm is
computed by the strategy (``run.strategy.clip_grad_norm``), so a sharded strategy returns the
true global norm over every rank's shard rather than this rank's part.

Decisions:

* ``max_norm`` clips the global norm (``torch.nn.utils.clip_grad_norm_`` semantics); ``value``
  clamps every gradient element to ``[-value, value]``. One of the two, not both.
* ``grad_norm`` is the norm *before* clipping (what ``clip_grad_norm_`` returns and what the
  Hugging Face Trainer logs), in both modes. It is added to the training log record (the one
  with ``"loss"``, every ``Config.log_every`` steps) by an ``on_log`` wrapper, as the
  ``throughput`` and ``memory`` plugins add theirs: one row per log in every logger, not a
  record of its own.
* The logged value is the norm of the **last step** before the log, as the HF Trainer logs it,
  not a mean or maximum over the interval: that costs nothing per step, and one fp16 step
  skipped for an overflow (an infinite norm, routine under dynamic loss scaling) does not make
  the whole interval's value infinite. The norm stays on the device until the log reads it
  (with the loss's synchronisation; none per step). ``last_norm`` holds the latest one for
  other plugins.
* The parameters are those of the optimizer's groups that have a gradient: exactly what the
  step will change.
* A non-finite norm is not this plugin's concern: fp16 loss scaling skips such steps, and the
  ``numeric-guard`` plugin handles the rest.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from treadle.errors import ConfigError
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["GradClip"]


def _positive(option: str, value: Any, *, allow_inf: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or math.isnan(value)
        or value <= 0
        or (math.isinf(value) and not allow_inf)
    ):
        kind = "a number > 0 (inf allowed)" if allow_inf else "a finite number > 0"
        raise ConfigError(f"grad-clip option {option} = {value!r} is not allowed: expected {kind}")
    return float(value)


class GradClip:
    """Clip the gradients before every optimizer step and log their norm.

    Args:
        max_norm: clip the global ``norm_type``-norm of all gradients to this bound. The
            default when neither ``max_norm`` nor ``value`` is given is 1.0.
        value: instead, clamp each gradient element to ``[-value, value]``.
        norm_type: the norm's order (2.0 by default; ``inf`` for the max-norm).
        log_every: add ``grad_norm`` to the training logs at steps that are multiples of N
            (make N a multiple of ``Config.log_every``); ``None``, the default: to every
            training log; 0: never.

    Example::

        treadle.Run(..., plugins=[{"name": "grad-clip", "max_norm": 1.0}])
    """

    name: ClassVar[str] = "grad-clip"

    def __init__(
        self,
        max_norm: float | None = None,
        value: float | None = None,
        norm_type: float = 2.0,
        log_every: int | None = None,
    ) -> None:
        if max_norm is not None and value is not None:
            raise ConfigError(
                f"grad-clip: max_norm={max_norm!r} and value={value!r} were both given; "
                "choose one (clip by global norm, or by value)"
            )
        if max_norm is None and value is None:
            max_norm = 1.0
        self.max_norm = None if max_norm is None else _positive("max_norm", max_norm)
        self.value = None if value is None else _positive("value", value)
        self.norm_type = _positive("norm_type", norm_type, allow_inf=True)
        if log_every is not None and (
            isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0
        ):
            raise ConfigError(
                f"grad-clip option log_every = {log_every!r} is not allowed: expected an "
                "integer >= 0, or None to follow Config.log_every"
            )
        self.log_every = log_every
        #: the pre-clipping norm of the latest step, on the device.
        self.last_norm: torch.Tensor | None = None

    def __repr__(self) -> str:
        bound = f"max_norm={self.max_norm}" if self.value is None else f"value={self.value}"
        return f"GradClip({bound}, norm_type={self.norm_type})"

    @hookimpl
    def on_before_optimizer_step(self, run: Run, optimizer: torch.optim.Optimizer) -> None:
        params = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        if not params:
            return
        if self.value is None:
            assert self.max_norm is not None
            self.last_norm = run.strategy.clip_grad_norm(params, self.max_norm, self.norm_type)
            return
        # an infinite bound measures without clipping (the scale factor is clamped to 1)
        self.last_norm = run.strategy.clip_grad_norm(params, math.inf, self.norm_type)
        torch.nn.utils.clip_grad_value_(params, self.value)

    @hookimpl(wrapper=True)
    def on_log(self, run: Run, metrics: Mapping[str, float]) -> Generator[None, Any, Any]:
        if (
            self.last_norm is not None
            and "loss" in metrics
            and isinstance(metrics, MutableMapping)
            and self._due(run.state.step)
        ):
            metrics["grad_norm"] = float(self.last_norm.item())
        return (yield)

    def _due(self, step: int) -> bool:
        if self.log_every is None:
            return True
        return self.log_every > 0 and step % self.log_every == 0
