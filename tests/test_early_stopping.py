"""``EarlyStopping``: scripted metric sequences, thresholds, options and state round trips."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import treadle
from treadle.errors import ConfigError, TreadleWarning
from treadle.plugins.callbacks.early_stopping import EarlyStopping

# A stop requested during a step boundary's evaluation is acted on at that same boundary (the
# loop re-reads plugins' requests after logging and evaluating), as the HF Trainer does.
STOP_LAG = 0


class FakeRun(SimpleNamespace):
    """Records stop requests instead of stopping."""

    def __init__(self) -> None:
        super().__init__(
            state=SimpleNamespace(step=0, epoch=0, last_metrics={}),
            is_main_process=True,
            stops=[],
        )

    def request_stop(self, reason: str) -> None:
        self.stops.append((self.state.step, reason))


def feed(plugin: EarlyStopping, values: Sequence[float], run: FakeRun | None = None) -> FakeRun:
    """Log ``values`` as evaluations at steps 10, 20, ... (with a training log in between)."""
    run = run or FakeRun()
    for value in values:
        run.state.step += 10
        plugin.on_log(run=run, metrics={"step": run.state.step, "epoch": 0, "loss": 5.0})
        plugin.on_log(run=run, metrics={"step": run.state.step, "epoch": 0, plugin.monitor: value})
    return run


def test_min_mode_stops_at_exactly_the_patience_th_bad_eval() -> None:
    plugin = EarlyStopping(patience=3)
    run = feed(plugin, [1.0, 0.9, 0.95, 0.91])
    assert run.stops == []
    assert plugin.bad_evals == 2
    feed(plugin, [0.92], run)
    assert len(run.stops) == 1
    step, reason = run.stops[0]
    assert step == 50  # the 5th evaluation
    assert reason == (
        "early stopping: eval/loss did not improve for 3 evaluations (best 0.9 at step 20)"
    )
    assert (plugin.best, plugin.best_step, plugin.stopped_step) == (0.9, 20, 50)

    # evaluations before the loop acts on the stop neither repeat the request nor move it
    feed(plugin, [0.93], run)
    assert len(run.stops) == 1 and plugin.stopped_step == 50
    # a new fit of the same run is stopped by its first evaluation that fails to improve
    plugin.on_fit_begin()
    feed(plugin, [0.94], run)
    assert [s for s, _ in run.stops] == [50, 70] and plugin.stopped_step == 70


def test_max_mode() -> None:
    plugin = EarlyStopping(monitor="eval/acc", mode="max", patience=2)
    run = feed(plugin, [0.5, 0.6, 0.55, 0.7, 0.69, 0.7])
    assert [s for s, _ in run.stops] == [60]
    assert "best 0.7 at step 40" in run.stops[0][1]


def test_improvement_resets_the_count() -> None:
    plugin = EarlyStopping(patience=2)
    run = feed(plugin, [1.0, 1.1, 0.8, 0.9, 0.7, 0.75])
    assert run.stops == []
    feed(plugin, [0.71], run)
    assert [s for s, _ in run.stops] == [70]


def test_equal_value_is_not_an_improvement() -> None:
    run = feed(EarlyStopping(patience=1), [1.0, 1.0])
    assert [s for s, _ in run.stops] == [20]


def test_abs_threshold() -> None:
    plugin = EarlyStopping(patience=2, threshold=0.1)
    # 0.95 and 0.91 are better than 1.0 but not by more than 0.1: both count as bad.
    run = feed(plugin, [1.0, 0.95, 0.91])
    assert [s for s, _ in run.stops] == [30]
    assert plugin.best == 1.0

    plugin = EarlyStopping(patience=2, threshold=0.1)
    run = feed(plugin, [1.0, 0.95, 0.85, 0.8])
    assert run.stops == [] and plugin.best == 0.85


def test_rel_threshold_in_both_modes() -> None:
    plugin = EarlyStopping(patience=1, threshold=0.1, threshold_mode="rel")
    run = feed(plugin, [10.0, 8.9, 8.1])  # 8.9 < 9.0 improves; 8.1 is not < 8.01
    assert plugin.best == 8.9 and [s for s, _ in run.stops] == [30]

    plugin = EarlyStopping(
        monitor="reward", mode="max", patience=1, threshold=0.5, threshold_mode="rel"
    )
    run = feed(plugin, [-2.0, -0.9, -0.5])  # relative to |best|: -0.9 > -1.0; -0.5 !> -0.45
    assert plugin.best == -0.9 and [s for s, _ in run.stops] == [30]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_non_finite_values_never_improve(mode: str) -> None:
    plugin = EarlyStopping(mode=mode, patience=2)
    run = feed(plugin, [1.0, float("nan"), float("inf" if mode == "max" else "-inf")])
    assert plugin.best == 1.0 and [s for s, _ in run.stops] == [30]


def test_logs_without_the_monitor_are_ignored() -> None:
    plugin = EarlyStopping(patience=1)
    run = FakeRun()
    for step in range(1, 20):
        plugin.on_log(run=run, metrics={"step": step, "epoch": 0, "loss": float(step)})
    assert run.stops == [] and plugin.best is None


def test_state_round_trip_continues_the_count() -> None:
    plugin = EarlyStopping(patience=3)
    run = feed(plugin, [1.0, 0.9, 0.95, 0.91])
    plugin_state: dict[str, Any] = {}
    plugin.on_save_checkpoint(plugin_state=plugin_state)
    saved = json.loads(json.dumps(plugin_state))  # what a checkpoint stores: JSON
    assert saved["early-stopping"]["bad_evals"] == 2

    restored = EarlyStopping(patience=3)
    restored.on_load_checkpoint(plugin_state=saved)
    assert (restored.best, restored.best_step, restored.bad_evals) == (0.9, 20, 2)
    feed(restored, [0.92], run)
    assert [s for s, _ in run.stops] == [50]


def test_load_ignores_state_of_another_monitor() -> None:
    plugin = EarlyStopping(monitor="eval/acc", mode="max")
    other = {"early-stopping": EarlyStopping().state_dict() | {"best": 0.1, "bad_evals": 2}}
    with pytest.warns(TreadleWarning, match="fresh counters"):
        plugin.on_load_checkpoint(plugin_state=other)
    assert plugin.best is None and plugin.bad_evals == 0
    plugin.on_load_checkpoint(plugin_state={})  # no state saved: nothing to do
    assert plugin.best is None


def test_warns_when_the_monitor_was_never_logged() -> None:
    plugin = EarlyStopping(monitor="eval/lss")
    run = FakeRun()
    run.state.last_metrics = {"eval/loss": 1.0, "loss": 2.0}
    plugin.on_fit_begin()
    plugin.on_log(run=run, metrics={"step": 1, "epoch": 0, "eval/loss": 1.0})
    with pytest.warns(TreadleWarning, match="'eval/lss'.*eval/loss"):
        plugin.on_fit_end(run=run)

    feed(plugin, [1.0], run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plugin.on_fit_end(run=run)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"monitor": ""}, "monitor"),
        ({"monitor": 3}, "monitor"),
        ({"mode": "minimum"}, "mode"),
        ({"patience": 0}, "patience"),
        ({"patience": 2.5}, "patience"),
        ({"patience": True}, "patience"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold_mode": "relative"}, "threshold_mode"),
    ],
)
def test_invalid_options_name_option_value_and_allowed(
    options: dict[str, Any], option: str
) -> None:
    with pytest.raises(ConfigError) as info:
        EarlyStopping(**options)
    message = str(info.value)
    assert f"{option} = {next(iter(options.values()))!r}" in message
    assert "expected" in message


def test_has_the_entry_point_name() -> None:
    assert EarlyStopping.name == "early-stopping"


# ---------------------------------------------------------------- end to end, with a real run


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.linear(x), y)}


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(4, 3, generator=generator)
        out.append({"x": x, "y": x.sum(dim=1, keepdim=True)})
    return out


def frozen_run(tmp_path: Path, plugin: Any, max_steps: int, **config: Any) -> treadle.Run:
    """A run whose eval loss never changes (learning rate 0): every eval after the first is bad."""
    torch.manual_seed(0)
    return treadle.Run(
        model=Regression(),
        train_data=batches(100),
        eval_data=batches(2),
        config=treadle.Config(
            max_steps=max_steps, log_every=1, eval_every=1, output_dir=str(tmp_path), **config
        ),
        optimizer={"name": "sgd", "lr": 0.0},
        loggers=[],
        checkpoint="safetensors",
        plugins=[plugin],
    )


def test_end_to_end_stops_the_fit(tmp_path: Path) -> None:
    plugin = EarlyStopping(patience=2)
    run = frozen_run(tmp_path, plugin, max_steps=50)
    state = run.fit()
    # evals at steps 1 (best), 2 and 3 (bad): the stop is requested at step 3
    assert plugin.stopped_step == 3
    assert state.step == 3 + STOP_LAG
    assert state.stop_reason == (
        f"early stopping: eval/loss did not improve for 2 evaluations "
        f"(best {plugin.best} at step 1)"
    )


def test_end_to_end_state_survives_resume(tmp_path: Path) -> None:
    first = EarlyStopping(patience=3)
    frozen_run(tmp_path, first, max_steps=3).fit()  # evals at 1 (best), 2, 3: two bad
    assert first.bad_evals == 2

    resumed = EarlyStopping(patience=3)
    run = frozen_run(tmp_path, resumed, max_steps=50, resume="auto")
    state = run.fit()
    # the restored count makes the first eval after the resume (step 4) the third bad one
    assert resumed.stopped_step == 4
    assert state.step == 4 + STOP_LAG
    assert resumed.best_step == 1
