"""A final stop (early stopping, any ``run.request_stop(reason)``) is part of the saved state:
resuming a stopped run trains no further, until ``run.clear_stop()``. A preemption and a step
limit are not stops in that sense: resuming continues.
"""

from __future__ import annotations

import json
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import toy

import treadle
from treadle import Preempted
from treadle.errors import TreadleWarning


class Steps:
    """Counts the optimizer steps this process takes."""

    def __init__(self) -> None:
        self.taken = 0

    @treadle.hookimpl
    def on_step_end(self) -> None:
        self.taken += 1


def make_run(out: Path, *plugins: Any, max_steps: int = 40) -> treadle.Run:
    """Training lowers eval/loss, and early stopping in "max" mode calls that no improvement:
    evaluations at 2 (best), 4 and 6 (bad): a stop at step 6, where a save is due as well."""
    torch.manual_seed(0)
    return treadle.Run(
        toy.model(dropout=0.1),
        toy.train_data(n=64),
        eval_data=toy.train_data(n=16, seed=7),
        config=treadle.Config(
            max_steps=max_steps,
            log_every=1,
            eval_every=2,
            save_every=3,
            output_dir=str(out),
            resume="auto",
        ),
        optimizer={"name": "adamw", "lr": 0.01},
        loggers=[],
        plugins=[
            {"name": "early-stopping", "monitor": "eval/loss", "mode": "max", "patience": 2},
            *plugins,
        ],
    )


def weights(run: treadle.Run) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in run.model.state_dict().items()}


def meta(out: Path, step: int) -> dict[str, Any]:
    path = out / "checkpoints" / f"step-{step:06d}" / "state.json"
    return json.loads(path.read_text())  # type: ignore[no-any-return]


@pytest.mark.timeout(120)
def test_running_an_early_stopped_run_again_trains_no_further(tmp_path: Path) -> None:
    whole = make_run(tmp_path / "whole")
    whole.fit()
    assert whole.state.step == 6 and whole.state.stop_reason.startswith("early stopping")

    first = make_run(tmp_path / "again")
    first.fit()
    # the save due at the stop step records the stop (it is decided before that save)
    assert meta(tmp_path / "again", 6)["stopped"] == first.state.stop_reason
    assert meta(tmp_path / "again", 3)["stopped"] is None

    steps = Steps()
    second = make_run(tmp_path / "again", steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = second.fit()
    assert steps.taken == 0 and state.step == 6
    assert state.stop_reason == first.state.stop_reason
    said = [str(w.message) for w in caught if issubclass(w.category, TreadleWarning)]
    assert len(said) == 1 and "already stopped at step 6 (early stopping" in said[0]
    assert "run.clear_stop()" in said[0]
    expected, actual = weights(whole), weights(second)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    # nothing new was written
    names = sorted(p.name for p in (tmp_path / "again" / "checkpoints").glob("step-*"))
    assert names == ["step-000003", "step-000006"]


@pytest.mark.timeout(120)
def test_clear_stop_trains_on(tmp_path: Path) -> None:
    make_run(tmp_path).fit()
    steps = Steps()
    run = make_run(tmp_path, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TreadleWarning)
        run.fit()
    assert steps.taken == 0
    run.clear_stop()
    run.fit()
    # the restored patience is spent: the next evaluation (step 8) stops it again
    assert steps.taken == 2 and run.state.step == 8
    assert meta(tmp_path, 8)["stopped"] == run.state.stop_reason


class SendSigterm:
    @treadle.hookimpl
    def on_step_end(self, run: treadle.Run) -> None:
        if run.state.step == 4:
            signal.raise_signal(signal.SIGTERM)


@pytest.mark.timeout(120)
def test_a_preempted_run_continues(tmp_path: Path) -> None:
    with pytest.raises(Preempted):
        make_run(tmp_path, SendSigterm()).fit()
    assert meta(tmp_path, 4)["stopped"] is None
    steps = Steps()
    run = make_run(tmp_path, steps)
    run.fit()
    assert steps.taken == 2 and run.state.step == 6  # on to the early stop


@pytest.mark.timeout(120)
def test_a_step_limit_is_not_a_stop(tmp_path: Path) -> None:
    make_run(tmp_path, max_steps=3).fit()
    assert meta(tmp_path, 3)["stopped"] is None
    steps = Steps()
    run = make_run(tmp_path, steps, max_steps=5)
    run.fit()
    assert steps.taken == 2 and run.state.step == 5 and run.state.stop_reason == "max_steps"


@pytest.mark.timeout(120)
def test_a_stop_that_is_not_final_is_resumed(tmp_path: Path) -> None:
    class Pause:
        @treadle.hookimpl
        def on_step_end(self, run: treadle.Run) -> None:
            if run.state.step == 3:
                run.request_stop("time budget spent", final=False)

    paused = make_run(tmp_path, Pause())
    paused.fit()
    assert paused.state.step == 3 and paused.state.stop_reason == "time budget spent"
    assert meta(tmp_path, 3)["stopped"] is None
    steps = Steps()
    make_run(tmp_path, steps).fit()
    assert steps.taken == 3
