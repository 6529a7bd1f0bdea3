"""Requests that act on epochs: `run.request_epoch_end()` skips the rest of an epoch, and a
request made at an epoch's end is acted on before the next epoch starts."""

from __future__ import annotations

import json
from pathlib import Path

import toy

import treadle


class EndEpochAt:
    """Ends epoch 0 after its `step`-th step; records every step and epoch end."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.seen: list[tuple[str, int, int]] = []

    @treadle.hookimpl
    def on_step_end(self, run: treadle.Run) -> None:
        self.seen.append(("step", run.state.epoch, run.state.step))
        if run.state.step == self.step:
            run.request_epoch_end()

    @treadle.hookimpl
    def on_epoch_end(self, run: treadle.Run, epoch: int) -> None:
        self.seen.append(("epoch_end", epoch, run.state.step))


def test_request_epoch_end_skips_the_rest_of_the_epoch(tmp_path: Path) -> None:
    plugin = EndEpochAt(step=1)
    run = treadle.Run(toy.model(), toy.train_data(32), loggers=[], plugins=[plugin],
                      config=treadle.Config(max_epochs=2, save_every=1, output_dir=str(tmp_path)))  # fmt: skip
    run.fit()
    assert plugin.seen == [
        ("step", 0, 1), ("epoch_end", 0, 1),
        ("step", 1, 2), ("step", 1, 3), ("step", 1, 4), ("step", 1, 5), ("epoch_end", 1, 5),
    ]  # fmt: skip
    # the checkpoint of the step that ended the epoch records the next epoch's start
    saved = json.loads((tmp_path / "checkpoints" / "step-000001" / "state.json").read_text())
    assert (saved["state"]["epoch"], saved["state"]["batch_in_epoch"]) == (1, 0)


class StopAtEpochEnd:
    def __init__(self) -> None:
        self.steps = 0

    @treadle.hookimpl
    def on_step_end(self) -> None:
        self.steps += 1

    @treadle.hookimpl
    def on_epoch_end(self, run: treadle.Run, epoch: int) -> None:
        run.request_save()
        run.request_stop("enough after one epoch")


def test_a_stop_requested_at_an_epoch_end_takes_no_further_step(tmp_path: Path) -> None:
    plugin = StopAtEpochEnd()
    run = treadle.Run(toy.model(), toy.train_data(32), loggers=[], plugins=[plugin],
                      config=treadle.Config(max_epochs=3, output_dir=str(tmp_path)))  # fmt: skip
    run.fit()
    assert plugin.steps == 4 and run.state.step == 4 and run.state.epoch == 1
    assert run.state.stop_reason == "enough after one epoch"
    saved = json.loads((tmp_path / "checkpoints" / "step-000004" / "state.json").read_text())
    assert saved["stopped"] == "enough after one epoch"  # the save came after the stop
