"""``early-stopping``: stop a fit when a monitored metric stops improving.

Every log that contains ``monitor`` counts as one evaluation. A value *improves* when it beats
the best so far by more than ``threshold`` (``threshold_mode="abs"``: by that amount;
``"rel"``: by that fraction of ``|best|``); the first value always improves. After ``patience``
evaluations in a row without improvement the plugin calls ``run.request_stop(...)``, which the
loop acts on at the next step boundary.

Decisions:

* A non-finite value (NaN, +/-inf) never improves, in either mode: a diverged run runs out of
  patience instead of ``+inf`` becoming the best of a ``"max"`` metric.
* Counters survive ``fit()`` called again on the same run (and checkpoints, under the key
  ``"early-stopping"``): an iterative algorithm that fits in rounds is stopped by the first
  evaluation that again fails to improve. Create a new instance to start over.
* A checkpoint written while monitoring a different metric or mode is ignored (with a warning)
  rather than mixing two metrics' bests.
* An evaluation metric (``eval/...``, or an eval set's name) that can never be logged (no eval
  data, no evaluation) is a ``ConfigError`` when the run is composed and again before a fit's
  first step; one logged only at the end of ``fit`` (no ``eval_every``/``eval_every_epoch``) gets a
  ``TreadleWarning``: the plugin can act only once.
* If ``monitor`` was never logged during a fit, a ``TreadleWarning`` says so at the end of the
  fit, listing the metrics that were logged: a misspelt name would otherwise fail silently.
* Metrics reach ``on_log`` identically on every rank, so every rank makes the same decision.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, ClassVar

from treadle.errors import ConfigError, TreadleWarning
from treadle.hookspecs import hookimpl
from treadle.plugins.defaults import check_monitor

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["EarlyStopping"]

_MODES = ("min", "max")
_THRESHOLD_MODES = ("abs", "rel")


def _invalid(option: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"early-stopping option {option} = {value!r} is not allowed: {allowed}")


class EarlyStopping:
    """Request a stop after ``patience`` evaluations without improvement of ``monitor``.

    Args:
        monitor: the logged metric to watch, e.g. ``"eval/loss"`` or ``"eval/accuracy"``.
        mode: ``"min"`` if smaller is better, ``"max"`` if larger is better.
        patience: evaluations without improvement to tolerate before stopping (>= 1).
        threshold: the least change that counts as an improvement (>= 0).
        threshold_mode: ``"abs"`` (``threshold`` in the metric's units) or ``"rel"``
            (a fraction of the best value's magnitude).
    """

    name: ClassVar[str] = "early-stopping"

    def __init__(
        self,
        monitor: str = "eval/loss",
        mode: str = "min",
        patience: int = 3,
        threshold: float = 0.0,
        threshold_mode: str = "abs",
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise _invalid("monitor", monitor, "expected a non-empty metric name, e.g. 'eval/loss'")
        if mode not in _MODES:
            raise _invalid("mode", mode, "expected 'min' (smaller is better) or 'max'")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise _invalid("patience", patience, "expected an integer >= 1")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not math.isfinite(threshold)
            or threshold < 0
        ):
            raise _invalid("threshold", threshold, "expected a finite number >= 0")
        if threshold_mode not in _THRESHOLD_MODES:
            raise _invalid(
                "threshold_mode", threshold_mode, "expected 'abs' (absolute) or 'rel' (relative)"
            )
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.threshold = float(threshold)
        self.threshold_mode = threshold_mode
        #: best value of ``monitor`` so far, and the step it was logged at.
        self.best: float | None = None
        self.best_step: int | None = None
        #: evaluations in a row without improvement.
        self.bad_evals = 0
        #: the step of the evaluation that exhausted the patience (the last fit's, if several).
        self.stopped_step: int | None = None
        self._seen_this_fit = False
        self._requested_this_fit = False
        self._checked_this_fit = False

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(monitor={self.monitor!r}, mode={self.mode!r}, "
            f"patience={self.patience}, threshold={self.threshold}, "
            f"threshold_mode={self.threshold_mode!r})"
        )

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than the threshold."""
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        margin = self.threshold if self.threshold_mode == "abs" else self.threshold * abs(self.best)
        if self.mode == "min":
            return value < self.best - margin
        return value > self.best + margin

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_init_end(self, run: Run) -> None:
        check_monitor(run, self.monitor, "early-stopping monitor")

    @hookimpl
    def on_fit_begin(self) -> None:
        self._seen_this_fit = False
        self._requested_this_fit = False
        self._checked_this_fit = False

    @hookimpl
    def on_epoch_begin(self, run: Run) -> None:
        # fit(**changes) may have removed the evaluation schedule since the run was composed;
        # checked before the fit's first step (on_fit_begin takes no run, for compatibility)
        if self._checked_this_fit:
            return
        self._checked_this_fit = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TreadleWarning)  # said once already, at composition
            check_monitor(run, self.monitor, "early-stopping monitor")

    @hookimpl
    def on_log(self, run: Run, metrics: Mapping[str, float]) -> None:
        if self.monitor not in metrics:
            return
        self._seen_this_fit = True
        value = float(metrics[self.monitor])
        step = int(metrics.get("step", run.state.step))
        if self.improves(value):
            self.best = value
            self.best_step = step
            self.bad_evals = 0
            return
        self.bad_evals += 1
        # One request per fit: it stands until the loop acts on it, and evaluations that run
        # before then must not move ``stopped_step``.
        if self.bad_evals >= self.patience and not self._requested_this_fit:
            self._requested_this_fit = True
            self.stopped_step = step
            run.request_stop(
                f"early stopping: {self.monitor} did not improve for {self.patience} "
                f"evaluations (best {self.best} at step {self.best_step})"
            )

    @hookimpl
    def on_fit_end(self, run: Run) -> None:
        if self._seen_this_fit or not run.is_main_process:
            return
        logged = sorted(set(run.state.last_metrics) - {"step", "epoch"}) or ["(nothing)"]
        warnings.warn(
            f"early-stopping monitors {self.monitor!r}, which was never logged during this fit, "
            f"so it could not stop it. Logged metrics: {', '.join(logged)}. Pass eval_data with "
            "Config.eval_every (or eval_every_epoch), or set monitor= to one of those names.",
            TreadleWarning,
            stacklevel=2,
        )

    @hookimpl
    def on_save_checkpoint(self, plugin_state: MutableMapping[str, Any]) -> None:
        plugin_state[self.name] = self.state_dict()

    @hookimpl
    def on_load_checkpoint(self, plugin_state: Mapping[str, Any]) -> None:
        state = plugin_state.get(self.name)
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The counters as JSON-serialisable data."""
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "stopped_step": self.stopped_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters saved by ``state_dict``, unless they were for another metric."""
        if state.get("monitor") != self.monitor or state.get("mode") != self.mode:
            warnings.warn(
                f"early-stopping: the checkpoint's state monitors {state.get('monitor')!r} "
                f"({state.get('mode')}), this run monitors {self.monitor!r} ({self.mode}); "
                "starting with fresh counters.",
                TreadleWarning,
                stacklevel=2,
            )
            return
        best = state.get("best")
        self.best = None if best is None else float(best)
        self.best_step = state.get("best_step")
        self.bad_evals = int(state.get("bad_evals", 0))
        self.stopped_step = state.get("stopped_step")
