"""The scheduler conformance suite: ``class TestMine(SchedulerConformance): scheduler = mine``.

A scheduler plugin is a factory ``factory(optimizer, total_steps=N, **options)`` returning an
object with ``step()``, ``state_dict()`` and ``load_state_dict()``. The suite checks that
interface, learning rates that stay finite and non-negative over ``total_steps``, a state dict
that restores the schedule mid-way, and a run that trains and resumes bit for bit.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch

from treadle.testing._fit import check_resume_exact, required
from treadle.testing.models import TinyModel
from treadle.testing.optimizer import resolve_factory

__all__ = ["SchedulerConformance"]


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


class SchedulerConformance:
    """Subclass it in a test module; pytest collects every ``test_`` method.

    Class attributes:
        scheduler: the factory, an entry-point name, or a ``{"name": ..., **options}`` mapping.
        options: options passed to the factory in every check (``{}``).
        total_steps: the ``total_steps`` the checks give the factory (``10``).
    """

    scheduler: ClassVar[Any] = None
    options: ClassVar[dict[str, Any]] = {}
    total_steps: ClassVar[int] = 10

    def _build(self) -> tuple[torch.optim.Optimizer, Any]:
        factory, options = resolve_factory("scheduler", required(self, "scheduler"))
        optimizer = torch.optim.SGD(TinyModel().parameters(), lr=0.1)
        scheduler = factory(optimizer, total_steps=self.total_steps, **{**options, **self.options})
        return optimizer, scheduler

    def test_has_the_scheduler_interface(self) -> None:
        _, scheduler = self._build()
        for method in ("step", "state_dict", "load_state_dict"):
            assert callable(getattr(scheduler, method, None)), f"the scheduler has no {method}()"

    def test_learning_rates_stay_finite(self) -> None:
        optimizer, scheduler = self._build()
        for step in range(self.total_steps):
            optimizer.step()
            scheduler.step()
            for lr in _lrs(optimizer):
                assert math.isfinite(lr) and lr >= 0, f"step {step + 1}: learning rate {lr}"

    def test_state_dict_restores_the_schedule(self) -> None:
        optimizer, scheduler = self._build()
        half = self.total_steps // 2
        for _ in range(half):
            optimizer.step()
            scheduler.step()
        state = copy.deepcopy(scheduler.state_dict())
        twin_optimizer, twin = self._build()
        twin_optimizer.load_state_dict(optimizer.state_dict())
        twin.load_state_dict(state)
        for step in range(half, self.total_steps):
            for o, s in ((optimizer, scheduler), (twin_optimizer, twin)):
                o.step()
                s.step()
            assert _lrs(twin_optimizer) == _lrs(optimizer), (
                f"step {step + 1}: the restored schedule gives {_lrs(twin_optimizer)}, "
                f"the original {_lrs(optimizer)}"
            )

    def test_resumes_bit_for_bit(self) -> None:
        factory, options = resolve_factory("scheduler", required(self, "scheduler"))
        options = {**options, **self.options}

        def scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int) -> Any:
            return factory(optimizer, total_steps=total_steps, **options)

        check_resume_exact(lambda: {"scheduler": scheduler})
