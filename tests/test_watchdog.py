"""The collective watchdog: a rank stuck outside a collective names the step, hook and plugin and
ends; the ranks waiting for it get an error naming the step, the collective and the timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import treadle
from treadle import testing
from treadle.errors import ConfigError, TreadleError
from treadle.plugins.strategies import _watchdog as watchdog
from treadle.plugins.strategies.ddp import DDPStrategy

WORKER = Path(__file__).parent / "fixtures" / "watchdog_worker.py"


def _two_ranks(tmp_path: Path, timeout_s: float, block_rank: int, block_step: int) -> list[Any]:
    """Start both ranks of watchdog_worker.py; (exit code, stderr) of each once both ended."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(testing.free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path),
    }
    processes = []
    for rank in (0, 1):
        err = open(tmp_path / f"err-{rank}.txt", "wb")  # noqa: SIM115 (closed below)
        with err:
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(tmp_path / "out"), str(timeout_s),
                     str(block_rank), str(block_step)],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                )
            )  # fmt: skip
    try:
        codes = [process.wait() for process in processes]  # bounded by the test's timeout
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [(code, (tmp_path / f"err-{rank}.txt").read_text()) for rank, code in enumerate(codes)]


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_plugin_blocking_one_rank_ends_both_ranks_and_names_itself(tmp_path: Path) -> None:
    (code0, err0), (code1, err1) = _two_ranks(tmp_path, timeout_s=5, block_rank=1, block_step=2)
    # the stuck rank: its watchdog names where it is stuck, and ends it
    assert code1 == watchdog.EXIT_CODE, err1[-3000:]
    assert "treadle: rank 1 made no progress" in err1, err1[-3000:]
    assert "at step 2, in hook 'on_step_end' of plugin 'blocker'" in err1, err1[-3000:]
    # the waiting rank: its collective fails with an error naming the step and the timeout
    assert code0 not in (0, None), err0[-3000:]
    assert "TreadleError: rank 0: collective 'agree' failed at step 2" in err0, err0[-3000:]
    assert "timeout (5 s; Config.collective_timeout_s)" in err0, err0[-3000:]


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_run_that_makes_progress_is_never_stopped_by_its_watchdog(tmp_path: Path) -> None:
    results = _two_ranks(tmp_path, timeout_s=5, block_rank=-1, block_step=0)
    for code, err in results:
        assert code == 0, err[-3000:]
        assert "made no progress" not in err


# ---------------------------------------------------------------------- in one process


class _Blocking:
    name = "slow-plugin"

    def __init__(self) -> None:
        self.release = threading.Event()

    @treadle.hookimpl
    def on_step_end(self) -> None:
        self.release.wait(timeout=60)


def _stall_message(run: treadle.Run, call: Any) -> str:
    """Start a watchdog (limit 0.2 s) in a thread that then runs ``call``; its report."""
    reported: list[str] = []
    done = threading.Event()

    def on_stall(message: str) -> None:
        reported.append(message)
        done.set()

    dog = watchdog.Watchdog(run, 0.2, rank=1, on_stall=on_stall)

    def thread() -> None:
        dog.start()
        call()

    worker = threading.Thread(target=thread, daemon=True)
    worker.start()
    assert done.wait(timeout=60), "the watchdog did not report"
    dog.stop()
    return reported[0]


@pytest.mark.timeout(120)
def test_the_report_names_the_step_the_hook_and_the_plugin() -> None:
    blocking = _Blocking()
    run = treadle.Run(torch.nn.Linear(2, 1), train_data=[], loggers=[], plugins=[blocking])
    run.state.step = 7
    try:
        message = _stall_message(
            run, lambda: run.plugin_manager.hook.on_step_end(run=run, loss=None)
        )
    finally:
        blocking.release.set()
    assert "treadle: rank 1 made no progress for" in message
    assert "at step 7, in hook 'on_step_end' of plugin 'slow-plugin'" in message
    assert "Config.collective_timeout_s = 0.2" in message
    assert "in on_step_end" in message  # the stack


@pytest.mark.timeout(120)
def test_outside_any_hook_the_report_names_the_function() -> None:
    release = threading.Event()

    def stuck_in_user_code() -> None:
        release.wait(timeout=60)

    run = treadle.Run(torch.nn.Linear(2, 1), train_data=[], loggers=[])
    try:
        message = _stall_message(run, stuck_in_user_code)
    finally:
        release.set()
    assert "at step 0, outside any hook, in wait (" in message  # the innermost frame
    assert "in stuck_in_user_code" in message  # the stack


def test_a_stopped_watchdog_has_no_thread_left() -> None:
    run = treadle.Run(torch.nn.Linear(2, 1), train_data=[], loggers=[])
    dog = watchdog.Watchdog(run, 600, rank=0)
    dog.start()
    assert dog.running
    dog.stop()
    assert not dog.running
    assert not any(t.name.startswith("treadle-watchdog") for t in threading.enumerate())


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True, "600"])
def test_collective_timeout_must_be_positive_seconds(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"Config.collective_timeout_s = .* positive number"):
        treadle.Config(collective_timeout_s=value)
    with pytest.raises(ConfigError, match=r"timeout=.* positive number of seconds"):
        DDPStrategy(timeout=value, device="cpu")


def test_none_and_numbers_are_accepted() -> None:
    assert treadle.Config().collective_timeout_s == 600.0  # well under torch's 30 minutes
    assert treadle.Config(collective_timeout_s=None).collective_timeout_s is None
    assert treadle.Config.from_dict({"collective_timeout_s": 5}).collective_timeout_s == 5


def test_a_lost_peer_becomes_an_error_naming_step_collective_and_timeout() -> None:
    strategy = DDPStrategy(device="cpu")
    strategy.timeout, strategy.rank = 42.0, 1
    run = treadle.Run(torch.nn.Linear(2, 1), train_data=[], loggers=[])
    run.state.step = 9
    strategy._state = run.state
    timed_out = RuntimeError("[gloo/unbound_buffer.cc:78] Timed out waiting 42000ms for recv")
    error = strategy._collective_failed("barrier", timed_out)
    assert isinstance(error, TreadleError)
    assert "rank 1: collective 'barrier' failed at step 9" in str(error)
    assert "timeout (42 s; Config.collective_timeout_s)" in str(error)
    closed = RuntimeError("[gloo/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    assert isinstance(strategy._collective_failed("agree", closed), TreadleError)
    # any other error of a collective (a wrong dtype, a bad shape) stays what it is
    other = RuntimeError("Tensors must be contiguous")
    assert strategy._collective_failed("all_reduce", other) is other
