"""``Config(save_async=True)``: checkpoints written by a background thread, same bytes, same
protocol. The crash tests (tests/test_crash_safety.py) SIGKILL async runs too."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import treadle
from tests.fixtures import toy
from treadle.checkpoint import verify
from treadle.errors import CheckpointError, ConfigError
from treadle.plugins.checkpoint.safetensors_format import SafetensorsFormat

pytestmark = pytest.mark.timeout(120)


def build(out: Path, *, save_async: bool, checkpoint: Any = "safetensors", **config: Any) -> Any:
    torch.manual_seed(0)
    values: dict[str, Any] = {
        "max_steps": 7,
        "grad_accum_steps": 2,
        "save_every": 2,
        "log_every": 0,
        "seed": 3,
        "output_dir": str(out),
        "save_async": save_async,
    }
    return treadle.Run(
        toy.model(width=8, dropout=0.1),
        toy.dataset(40),
        config=treadle.Config(batch_size=4, **{**values, **config}),
        optimizer={"name": "adamw", "lr": 0.05},
        scheduler={"name": "cosine", "warmup_steps": 2},
        loggers=[],
        checkpoint=checkpoint,
    )


def contents(out: Path) -> dict[str, Any]:
    """Each checkpoint's files (size and SHA-256), and its state.json less the clock's readings."""
    found = {}
    for path in (out / "checkpoints").glob("step-*"):
        files = json.loads((path / "manifest.json").read_text())["files"]
        files.pop("state.json")
        state = json.loads((path / "state.json").read_text())
        for timed in ("samples_per_s", "step_time_s"):
            state["state"]["last_metrics"].pop(timed, None)
        found[path.name] = (files, state)
    return found


def test_async_checkpoints_are_byte_identical_to_synchronous_ones(tmp_path: Path) -> None:
    sync, background = tmp_path / "sync", tmp_path / "async"
    build(sync, save_async=False).fit()
    run = build(background, save_async=True)
    run.fit()
    expected = contents(sync)
    assert sorted(expected) == ["step-000002", "step-000004", "step-000006", "step-000007"]
    assert contents(background) == expected
    assert (background / "checkpoints" / "latest").read_text() == "step-000007\n"
    assert run.last_checkpoint == background / "checkpoints" / "step-000007"
    assert not [t for t in threading.enumerate() if t.name == "treadle-checkpoint-writer"]


class Gate(SafetensorsFormat):
    """A format whose model write waits until the training thread has gone on a step."""

    def __init__(self) -> None:
        super().__init__()
        self.trained_on = threading.Event()
        self.writing = 0
        self.most_at_once = 0
        self.lock = threading.Lock()

    def save_model(self, directory: Path, model: nn.Module, state: Any) -> list[str]:
        with self.lock:
            self.writing += 1
            self.most_at_once = max(self.most_at_once, self.writing)
        try:
            if threading.current_thread() is not threading.main_thread():
                # training goes on changing the weights meanwhile: the copy must not see it
                assert self.trained_on.wait(30), "the step did not go on while writing"
            return super().save_model(directory, model, state)
        finally:
            with self.lock:
                self.writing -= 1


class Watch:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.events: list[str] = []

    @treadle.hookimpl
    def on_step_end(self, run: treadle.Run) -> None:
        self.weights[run.state.step] = {
            k: v.detach().clone() for k, v in run.model.state_dict().items()
        }
        if run.state.step % 2 == 1:  # the step after a save has changed the weights
            self.gate.trained_on.set()
        else:
            self.gate.trained_on.clear()

    @treadle.hookimpl
    def on_save_end(self, path: Path) -> None:
        self.events.append(path.name)


def test_the_step_goes_on_while_the_save_writes_a_copy(tmp_path: Path) -> None:
    gate = Gate()
    watch = Watch(gate)
    run = build(tmp_path, save_async=True, checkpoint=gate)
    run.add_plugin(watch)
    run.fit()
    assert gate.most_at_once == 1  # at most one save in flight
    # each on_save_end fired once, in order, when its save was complete
    assert watch.events == ["step-000002", "step-000004", "step-000006", "step-000007"]
    for name in watch.events:
        path = tmp_path / "checkpoints" / name
        assert verify(path) == []
        stored = load_file(path / "model.safetensors")
        taken = watch.weights[int(name[5:])]
        assert stored.keys() == taken.keys()
        for key in taken:
            assert torch.equal(stored[key], taken[key]), (name, key)


class Failing(SafetensorsFormat):
    def save_model(self, directory: Path, model: nn.Module, state: Any) -> list[str]:
        if directory.name == ".step-000004.tmp":
            raise OSError(28, "No space left on device")
        return super().save_model(directory, model, state)


def test_a_failed_background_save_raises_at_the_next_save_and_keeps_the_previous(
    tmp_path: Path,
) -> None:
    run = build(tmp_path, save_async=True, checkpoint=Failing())
    with pytest.raises(CheckpointError, match=r"background save of step-000004 failed") as info:
        run.fit()
    assert "No space left on device" in str(info.value)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step-000002\n"
    assert verify(root / "step-000002") == []
    assert run.state.step == 6  # raised by the save of step 6, before it wrote anything
    assert not (root / "step-000004").exists() and not (root / "step-000006").exists()
    # the next start cleans up and resumes from the whole one
    resumed = build(tmp_path, save_async=True, resume="auto")
    resumed.fit()
    assert not list(root.glob(".step-*"))
    assert sorted(p.name for p in root.glob("step-*"))[-1] == "step-000007"


def test_an_async_run_resumes_exactly(tmp_path: Path) -> None:
    whole = build(tmp_path / "whole", save_async=True)
    whole.fit()
    written_in_background = tmp_path / "whole" / "checkpoints" / "step-000004"
    second = build(tmp_path / "second", save_async=True, resume=str(written_in_background))
    second.fit()
    assert second.state.step == 7
    for key, value in whole.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("checkpoint", "message"),
    [
        (None, "save_async = True is not allowed with checkpoint=None"),
        ("dcp", "save_async = True is not allowed with checkpoint='dcp'"),
    ],
)
def test_save_async_refuses_what_it_cannot_do(
    tmp_path: Path, checkpoint: str | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build(tmp_path, save_async=True, checkpoint=checkpoint)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_async_saves_on_two_processes(tmp_path: Path) -> None:
    import dist_workers

    from treadle import testing

    results = testing.run_distributed(dist_workers.async_saves, str(tmp_path), world_size=2)
    root = tmp_path / "whole" / "checkpoints"
    for seen in results:
        assert seen["whole"] == str(root / "step-000005")
        # the main process's failed write raises on both ranks, at the next save
        assert seen["failing"].startswith("CheckpointError: the background save of step-000004")
    assert "No space left on device" in results[0]["failing"]
    assert "on another rank" in results[1]["failing"]
    for step in ("step-000002", "step-000004", "step-000005"):
        assert verify(root / step) == []
        assert {p.name for p in (root / step).glob("rng-rank*.json")} == {
            "rng-rank00000.json",
            "rng-rank00001.json",
        }
    failing = tmp_path / "failing" / "checkpoints"
    assert (failing / "latest").read_text() == "step-000002\n"
