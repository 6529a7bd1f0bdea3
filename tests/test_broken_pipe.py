"""Ctrl-C with stderr a pipe whose reader died (``python train.py 2>&1 | tee log``, ``tee``
killed by the same SIGINT): the run still saves and exits 130. Nothing that reports progress
(the signal handler's message, the console logger) may kill the save.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import toy

import treadle
from treadle import checkpoint
from treadle.plugins.loggers.console import ConsoleLogger

FIXTURES = Path(__file__).parent / "fixtures"

SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {fixtures!r})
import toy, treadle

out = Path(sys.argv[1])

class Gate:
    # at step 3: say so, then wait until the test has broken the pipe and sent SIGINT
    @treadle.hookimpl
    def on_step_end(self, run):
        if run.state.step == 3:
            (out / "at-step-3").write_text("")
            while not (out / "go").exists():
                time.sleep(0.01)

run = treadle.Run(
    toy.model(), toy.train_data(),
    config=treadle.Config(max_steps=1000, log_every=1, output_dir=str(out)),
    loggers=[{{"name": "console", "bar": False}}],
    plugins=[Gate()],
)
run.fit()
"""


@pytest.mark.timeout(120)
def test_ctrl_c_with_a_broken_stderr_pipe_still_saves(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(fixtures=str(FIXTURES))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(script), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        while not (out / "at-step-3").exists():  # no timing: the child waits for us
            if process.poll() is not None:
                assert process.stderr is not None
                pytest.fail(f"the run ended early: {process.stderr.read().decode()}")
            time.sleep(0.01)
        assert process.stderr is not None
        process.stderr.close()  # the reader dies (as tee does on the same Ctrl-C)
        process.send_signal(signal.SIGINT)
        (out / "go").write_text("")
        code = process.wait(timeout=100)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 130
    latest = out / "checkpoints" / "latest"
    saved = out / "checkpoints" / latest.read_text().strip()
    assert checkpoint.verify(saved) == []
    assert 3 <= int(saved.name[5:]) < 1000


class BrokenPipe(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bar", [False, True], ids=["lines", "bar"])
def test_console_logger_gives_up_a_broken_stream(tmp_path: Path, bar: bool) -> None:
    stream = BrokenPipe()
    run = treadle.Run(
        toy.model(),
        toy.train_data(),
        eval_data=toy.train_data(n=16),
        config=treadle.Config(max_steps=6, log_every=1, eval_every=3, output_dir=str(tmp_path)),
        loggers=[ConsoleLogger(bar=bar, file=stream, refresh_s=0)],
    )
    run.fit()  # no error: progress reports never stop a run
    assert run.state.step == 6 and (tmp_path / "checkpoints" / "step-000006").is_dir()
    assert stream.writes == 1  # the first failure ends the writing
