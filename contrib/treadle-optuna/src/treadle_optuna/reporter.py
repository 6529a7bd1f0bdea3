"""The plugin that ties a run to its Optuna trial: report each evaluation, stop when pruned."""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

import treadle

if TYPE_CHECKING:
    import optuna

__all__ = ["TrialReporter"]


class TrialReporter:
    """Reports ``metric`` to ``trial`` after every evaluation (``trial.report(value, step)``)
    and, when the pruner says so, asks the run to stop at that step boundary.

    A non-finite value (a diverged run) prunes at once: no pruner ranks a NaN, and no later
    step can recover from it. Added to each trial's run by ``treadle_optuna.search``; add it
    yourself to drive a trial from your own objective.
    """

    def __init__(self, trial: optuna.Trial, metric: str = "eval/loss") -> None:
        self.trial = trial
        self.metric = metric
        #: the last value reported, and the step it was reported at
        self.last_value: float | None = None
        self.last_step: int | None = None
        #: the step at which the trial was pruned, None while it runs on
        self.pruned_at: int | None = None

    @treadle.hookimpl
    def on_eval_end(self, run: treadle.Run, metrics: MutableMapping[str, float]) -> None:
        if self.metric not in metrics or self.pruned_at is not None:
            return
        value, step = float(metrics[self.metric]), run.state.step
        if step != self.last_step:  # Optuna keeps one value per step (a later one is ignored)
            self.trial.report(value, step)
        self.last_value, self.last_step = value, step
        if not math.isfinite(value) or self.trial.should_prune():
            self.pruned_at = step
            run.request_stop(
                f"pruned by Optuna (trial {self.trial.number}) at step {step}: "
                f"{self.metric} = {value:.6g}"
            )
