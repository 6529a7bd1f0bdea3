"""``State``: the counters of a run, plain data that round-trips through JSON."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import attrs
import torch

__all__ = ["FitState", "LossSum", "State"]


class LossSum(NamedTuple):
    """A loss as ``total`` (sum over scored items) and ``count`` (number of items scored).

    Returned by ``compute_loss`` when the loss must be normalised over a whole accumulation
    window (``loss_normalization="tokens"``): the kernel divides by the window's count.
    """

    total: torch.Tensor
    count: torch.Tensor | int  # type: ignore[assignment]  # the field shadows tuple.count


@attrs.define(kw_only=True)
class State:
    """Where a run is. Plugins read it; the kernel writes it (plugins use ``run.request_*``)."""

    #: optimizer steps completed.
    step: int = 0
    #: current epoch (0-based); after the last epoch, the number of epochs completed.
    epoch: int = 0
    #: batches of the current epoch already consumed (the data position for resume).
    batch_in_epoch: int = 0
    #: micro-batches processed in total.
    micro_step: int = 0
    #: optimizer steps skipped by the precision backend (non-finite gradients).
    skipped_steps: int = 0
    #: training samples (batch rows) and target tokens processed, this rank.
    samples_seen: int = 0
    tokens_seen: int = 0
    #: the best value of ``Config.monitor`` so far and the step it was logged at.
    best_metric: float | None = None
    best_step: int | None = None
    #: why the last ``fit()`` stopped ("max_steps", "max_epochs", or a plugin's reason).
    stop_reason: str | None = None
    #: the most recent value of every logged metric.
    last_metrics: dict[str, float] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> State:
        known = {field.name for field in attrs.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclasses.dataclass(eq=False)
class FitState:
    """What a fit keeps besides ``State``, and never checkpoints: plugins' requests, the stop
    under way, preemption, the training data's shape, when it last evaluated and saved.

    The loop owns it (``run.fit_state``, one per run); ``Run``'s methods (``request_stop``,
    ``skip_step``, ...) are how plugins change it, and nothing else writes it.
    """

    #: requests pending until the next step boundary: bits of ``treadle.loop`` (STOP, SAVE, ...)
    requests: int = 0
    #: why the fit is to stop (a plugin's reason, "max_steps", "preempted (SIGTERM)", ...)
    stop_reason: str | None = None
    #: the fit stops at this step boundary (``run.is_stopping()``)
    stopping: bool = False
    #: a final stop of this fit (its checkpoints record it), and of the checkpoint resumed
    final_stop: str | None = None
    resumed_stop: str | None = None
    #: why the current optimizer step is dropped (``run.skip_step``), until it is
    skip_reason: str | None = None
    #: a signal arrived (the number), the stop it asked for is under way, and in words
    signal: int | None = None
    preempt_requests: int = 0
    preempted: bool = False
    preempt_reason: str | None = None
    #: the checkpoint named by ``Config.resume`` is loaded (a later fit does not load it again)
    resumed: bool = False
    #: the training loader of this fit and its length (None: unknown)
    train_loader: Any = None
    batches_per_epoch: int | None = None
    #: each eval set's number of batches, once evaluated
    eval_lengths: dict[str, int | None] = dataclasses.field(default_factory=dict)
    #: scored tokens not yet added to ``State.tokens_seen`` (kept on the device)
    tokens_pending: torch.Tensor | int = 0
    last_eval_step: int | None = None
    last_save_step: int | None = None
    #: the step ``Config.monitor`` was last logged at; whether this fit logged it
    monitor_step: int | None = None
    monitor_logged: bool = False
    #: why the checkpoint being written is an emergency one (a failure), else None
    emergency: str | None = None
    #: ``torch.autograd.backward`` while ``run.backward`` would only call it (no backward event
    #: has listeners, neither ``Strategy.backward`` nor ``Precision.scale_loss`` is overridden)
    plain_backward: Callable[[torch.Tensor], None] | None = None
    #: ``Strategy.forward_context`` would enter nothing (neither it nor the precision's is
    #: overridden): a provider may call the model without it
    plain_forward: bool = False
    #: the optimizer step of this fit, built when it starts (``treadle.loop.build_step``)
    step: Callable[[list[Any]], torch.Tensor] | None = None
