"""``lr-monitor``: the learning rate of every parameter group, in every training log.

Adds ``lr/<group>`` to every training log (the record with ``"loss"``), where ``<group>`` is
the group's ``"name"`` entry if it has one (``{"params": ..., "name": "decoder"}``), else
``group0``, ``group1``, ... in the optimizer's order. The kernel's own ``lr`` is group 0's.
Optionally also ``momentum/<group>`` (``momentum``, or ``betas[0]`` for Adam-like optimizers)
and ``weight_decay/<group>``. Values are read from the optimizer at log time only.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from treadle.errors import ConfigError
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["LearningRateMonitor", "group_values"]


def _label(group: Mapping[str, Any], index: int) -> str:
    name = group.get("name")
    return name if isinstance(name, str) and name else f"group{index}"


def group_values(
    optimizer: torch.optim.Optimizer, *, momentum: bool = False, weight_decay: bool = False
) -> dict[str, float]:
    """``lr/<group>`` (and optionally ``momentum/<group>``, ``weight_decay/<group>``)."""
    values = {}
    for index, group in enumerate(optimizer.param_groups):
        label = _label(group, index)
        values[f"lr/{label}"] = float(group["lr"])  # float(): a capturable lr is a tensor
        if momentum:
            beta = group.get("momentum", (group.get("betas") or (None,))[0])
            if beta is not None:
                values[f"momentum/{label}"] = float(beta)
        if weight_decay and group.get("weight_decay") is not None:
            values[f"weight_decay/{label}"] = float(group["weight_decay"])
    return values


class LearningRateMonitor:
    """Every parameter group's learning rate in every training log.

    Args:
        momentum: also log each group's momentum (or first Adam beta).
        weight_decay: also log each group's weight decay.
    """

    name: ClassVar[str] = "lr-monitor"

    def __init__(self, momentum: bool = False, weight_decay: bool = False) -> None:
        for option, value in (("momentum", momentum), ("weight_decay", weight_decay)):
            if not isinstance(value, bool):
                raise ConfigError(
                    f"lr-monitor option {option} = {value!r} is not allowed: expected True or False"
                )
        self.momentum = momentum
        self.weight_decay = weight_decay

    @hookimpl(wrapper=True)
    def on_log(self, run: Run, metrics: Mapping[str, float]) -> Generator[None, Any, Any]:
        if run.optimizer is not None and "loss" in metrics and isinstance(metrics, MutableMapping):
            metrics.update(
                group_values(run.optimizer, momentum=self.momentum, weight_decay=self.weight_decay)
            )
        return (yield)
