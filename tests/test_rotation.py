"""Rotation: keep the last N and the best K by a metric; delete only after a save is complete."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import toy

import treadle
from treadle.errors import TreadleError
from treadle.plugins.checkpoint.safetensors_format import SafetensorsFormat


class Scores:
    """Logs ``score`` = ``values[step]`` at the steps that have one; records what remains."""

    def __init__(self, values: Mapping[int, float]) -> None:
        self.values = values
        self.remaining: dict[int, list[int]] = {}

    @treadle.hookimpl
    def on_step_end(self, run: treadle.Run) -> None:
        if run.state.step in self.values:
            run.log({"score": self.values[run.state.step]})

    @treadle.hookimpl
    def on_save_end(self, run: treadle.Run, path: Path) -> None:
        self.remaining[run.state.step] = steps_in(path.parent)


def steps_in(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.glob("step-*"))


def fit(
    out: Path,
    values: Mapping[int, float],
    *,
    max_steps: int = 8,
    checkpoint: Any = "safetensors",
    resume: str | None = None,
    **config: Any,
) -> Scores:
    torch.manual_seed(0)
    scores = Scores(values)
    run = treadle.Run(
        toy.model(),
        toy.train_data(n=32, batch_size=4),
        config=treadle.Config(
            max_steps=max_steps,
            save_every=1,
            log_every=0,
            output_dir=str(out),
            resume=resume,
            **config,
        ),
        optimizer={"name": "sgd", "lr": 0.01},
        loggers=[],
        checkpoint=checkpoint,
        plugins=[scores],
    )
    run.fit()
    return scores


def test_keep_last_two_and_the_best_one_found_early(tmp_path: Path) -> None:
    values = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 6.0, 6: 2.0, 7: 8.0, 8: 9.0}
    scores = fit(tmp_path, values, keep_last=2, keep_best=1, monitor="score")
    assert steps_in(tmp_path / "checkpoints") == [2, 7, 8]
    # after every save: the two newest, plus the best so far (step 2 from its save on)
    assert scores.remaining == {
        1: [1], 2: [1, 2], 3: [2, 3], 4: [2, 3, 4], 5: [2, 4, 5],
        6: [2, 5, 6], 7: [2, 6, 7], 8: [2, 7, 8],
    }  # fmt: skip
    meta = json.loads((tmp_path / "checkpoints" / "step-000002" / "state.json").read_text())
    assert meta["monitor"] == "score" and meta["metric"] == 1.0
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000008"


def test_keep_best_by_max_and_only_ranked_checkpoints(tmp_path: Path) -> None:
    # the metric is logged at even steps only: odd checkpoints are not ranked by it
    values = {2: 0.5, 4: 0.9, 6: 0.7, 8: 0.1}
    fit(tmp_path, values, keep_last=1, keep_best=2, monitor="score", monitor_mode="max")
    assert steps_in(tmp_path / "checkpoints") == [4, 6, 8]
    meta = json.loads((tmp_path / "checkpoints" / "step-000008" / "state.json").read_text())
    assert meta["metric"] == 0.1


def test_keep_last_alone_and_keep_all(tmp_path: Path) -> None:
    fit(tmp_path / "last", {}, keep_last=3)
    assert steps_in(tmp_path / "last" / "checkpoints") == [6, 7, 8]
    fit(tmp_path / "all", {}, max_steps=4)
    assert steps_in(tmp_path / "all" / "checkpoints") == [1, 2, 3, 4]


class FailingFormat(SafetensorsFormat):
    """Fails while writing the weights of its ``fail_at``-th save."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at, self.saves = fail_at, 0

    def save_model(self, directory: Path, model: Any, state: Any) -> list[str]:
        self.saves += 1
        if self.saves == self.fail_at:
            super().save_model(directory, model, state)
            raise OSError("disk full (simulated)")
        return super().save_model(directory, model, state)


def test_nothing_is_deleted_before_the_new_checkpoint_is_complete(tmp_path: Path) -> None:
    with pytest.raises((OSError, TreadleError), match="disk full"):
        fit(tmp_path, {}, keep_last=1, checkpoint=FailingFormat(fail_at=4))
    root = tmp_path / "checkpoints"
    # the failed save of step 4 neither replaced nor deleted step 3, nor moved `latest`
    assert steps_in(root) == [3]
    assert (root / "latest").read_text().strip() == "step-000003"
    assert treadle.checkpoint.verify(root / "step-000003") == []
    assert (root / ".step-000004.tmp").is_dir()
    # the next run resumes from step 3; its first complete save clears the leftover
    fit(tmp_path, {}, keep_last=1, resume="auto")
    assert steps_in(root) == [8]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000008"]


def test_checkpoints_of_another_line_are_left_alone(tmp_path: Path) -> None:
    fit(tmp_path / "a", {}, max_steps=6)
    root = tmp_path / "a" / "checkpoints"
    # resume from step 2 explicitly: steps 3.. are rewritten, step 6 and later are the old
    # line's until this one overwrites them; rotation counts only this line's
    fit(tmp_path / "a", {}, max_steps=4, keep_last=1, resume=str(root / "step-000002"))
    assert steps_in(root) == [4, 5, 6]
