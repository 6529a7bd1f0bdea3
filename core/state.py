"""``State``: the counters of a run, plain data that round-trips through JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import attrs
import torch

__all__ = ["LossSum", "State"]


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
