"""Preemption: SIGTERM or SIGINT finishes the step, saves, and exits with 128 + the signal.

The exit code is documented in docs/checkpoints.md and in ``Run.fit``: 143 for SIGTERM, 130
for SIGINT. A resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import ckpt_victim
import pytest
import torch
from ckpt_runs import MAX_STEPS, Recorder, assert_same_training, make_run

import treadle
from treadle import Preempted
from treadle.loop import PREEMPT
from treadle.plugins.strategies.single import SingleDevice

FIXTURES = Path(__file__).parent / "fixtures"


class SendSignal:
    """Sends ``signum`` to this process at the end of step ``at`` (``times`` times)."""

    def __init__(self, signum: int, at: int, times: int = 1) -> None:
        self.signum, self.at, self.times = signum, at, times
        self.handler_during_fit: Any = None

    @treadle.hookimpl
    def on_step_end(self, run: treadle.Run) -> None:
        self.handler_during_fit = signal.getsignal(self.signum)
        if run.state.step == self.at:
            for _ in range(self.times):
                signal.raise_signal(self.signum)


@pytest.mark.parametrize("at", [5, 7], ids=["at-epoch-end", "mid-epoch"])
def test_sigterm_saves_exits_143_and_resumes_exactly(tmp_path: Path, at: int) -> None:
    reference = make_run(tmp_path / "full")
    reference[0].fit()

    before = signal.getsignal(signal.SIGTERM)
    sender = SendSignal(signal.SIGTERM, at=at)
    first = make_run(tmp_path / "stopped", plugins=(sender,))
    with pytest.raises(Preempted) as caught:
        first[0].fit()
    assert isinstance(caught.value, SystemExit) and caught.value.code == 143
    assert caught.value.signal == signal.SIGTERM
    saved = tmp_path / "stopped" / "checkpoints" / f"step-{at:06d}"
    assert caught.value.checkpoint == saved and treadle.checkpoint.verify(saved) == []
    assert first[0].state.step == at and first[0].state.stop_reason == "preempted (SIGTERM)"
    # saved at the step boundary, before any end-of-fit evaluation (the grace period is short)
    assert [step for step, _ in first[1].evals] == [4]
    # the handler was treadle's while fitting, and the previous one is back
    assert sender.handler_during_fit is not before
    assert signal.getsignal(signal.SIGTERM) is before

    second = make_run(tmp_path / "stopped", resume="auto")
    second[0].fit()
    assert second[1].started_at == at
    assert_same_training(reference, [first, second])


def test_sigint_exits_130_and_a_second_one_interrupts_at_once(tmp_path: Path) -> None:
    # A shell starts background jobs (as CI may) with SIGINT ignored; a second SIGINT then
    # does what the previous handler does: nothing. Test with Python's own handler in place.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _sigint_twice(tmp_path)
    finally:
        signal.signal(signal.SIGINT, outer)


def _sigint_twice(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT)
    run, _ = make_run(tmp_path / "once", plugins=(SendSignal(signal.SIGINT, at=2),))
    with pytest.raises(Preempted) as caught:
        run.fit()
    assert caught.value.code == 130 and run.state.step == 2
    assert (tmp_path / "once" / "checkpoints" / "step-000002").is_dir()

    run, _ = make_run(tmp_path / "twice", plugins=(SendSignal(signal.SIGINT, at=2, times=2),))
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    assert not (tmp_path / "twice" / "checkpoints").exists()  # no save: the user insisted
    assert signal.getsignal(signal.SIGINT) is before


def test_no_handlers_outside_the_main_thread(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen: list[Any] = []

    class Look:
        @treadle.hookimpl
        def on_step_end(self) -> None:
            seen.append(signal.getsignal(signal.SIGTERM))

    errors: list[BaseException] = []

    def train() -> None:
        try:
            make_run(tmp_path, plugins=(Look(),), max_steps=3)[0].fit()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive() and not errors
    assert seen and all(handler is before for handler in seen)


class OtherRankSignalled(SingleDevice):
    """A strategy whose (simulated) other rank received a signal before step ``at`` ended."""

    def __init__(self, at: int) -> None:
        super().__init__("cpu")
        self.at, self.step = at, 0

    def agree(self, requests: int) -> int:
        self.step += 1
        return requests | PREEMPT if self.step >= self.at else requests


def test_a_signal_on_another_rank_stops_this_one_too(tmp_path: Path) -> None:
    torch.manual_seed(0)
    run = treadle.Run(
        ckpt_victim.toy.model(),
        ckpt_victim.toy.train_data(),
        config=treadle.Config(max_steps=6, output_dir=str(tmp_path)),
        strategy=OtherRankSignalled(at=3),
        loggers=[],
    )
    with pytest.raises(Preempted) as caught:
        run.fit()
    assert caught.value.code == 143 and run.state.step == 3
    assert run.state.stop_reason == "preempted (a signal reached another rank)"
    assert (tmp_path / "checkpoints" / "step-000003").is_dir()


def _losses(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.slow
def test_sigterm_from_outside_a_training_process(tmp_path: Path) -> None:
    out = tmp_path / "victim"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(FIXTURES / "ckpt_victim.py"), "train", str(out)]
    process = subprocess.Popen(
        [*command, "--slow", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip() == "step 3":
                process.send_signal(signal.SIGTERM)
                break
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, stderr
    assert "SIGTERM received" in stderr and "Traceback" not in stderr
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest[5:])
    assert 3 <= stopped_at < MAX_STEPS and not (out / "final.safetensors").exists()

    # resumed in this process, against an uninterrupted run of the same script's set-up
    recorder = Recorder()
    resumed = ckpt_victim.build(out, plugins=[recorder])
    resumed.fit()
    assert recorder.started_at == stopped_at
    reference_recorder = Recorder()
    reference = ckpt_victim.build(tmp_path / "reference", plugins=[reference_recorder])
    reference.fit()
    expected, actual = reference.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    logged = _losses(out / "losses.jsonl") + [(s, loss) for s, loss, _ in recorder.train]
    assert logged == [(s, loss) for s, loss, _ in reference_recorder.train]
