"""Shared fixtures for treadle-optuna tests: the toy regression (``optuna_toy``) as a Python
run and as a run file, and a quiet Optuna."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import optuna_toy
import pytest

import treadle

HERE = Path(__file__).parent
MAX_STEPS = 30
EVAL_EVERY = 5

RUN_FILE = f"""\
model = "optuna_toy:model"
train_data = "optuna_toy:train_data"
eval_data = "optuna_toy:eval_data"
loggers = ["jsonl"]

[config]
max_steps = {MAX_STEPS}
eval_every = {EVAL_EVERY}
log_every = 0
seed = 0

[optimizer]
name = "sgd"
lr = 0.01
"""

SPACE_FILE = """\
[optimizer.lr]
type = "float"
low = 1e-4
high = 1.0
log = true
"""


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield


def toy_run(lr: float, output_dir: str | Path) -> treadle.Run:
    """The toy regression with SGD at ``lr``: what the run file trains, built in Python."""
    treadle.seed_everything(0)  # as `treadle run` does before calling the model factory
    return treadle.Run(
        optuna_toy.model(),
        optuna_toy.train_data(),
        optuna_toy.eval_data(),
        config=treadle.Config(
            max_steps=MAX_STEPS, eval_every=EVAL_EVERY, log_every=0, output_dir=str(output_dir)
        ),
        optimizer={"name": "sgd", "lr": lr},
        loggers=[],
    )


@pytest.fixture
def run_files(tmp_path: Path) -> tuple[Path, Path]:
    """``run.toml`` and ``space.toml`` for the toy regression, in ``tmp_path``."""
    run_file, space_file = tmp_path / "run.toml", tmp_path / "space.toml"
    run_file.write_text(RUN_FILE, encoding="utf-8")
    space_file.write_text(SPACE_FILE, encoding="utf-8")
    return run_file, space_file


def treadle_cli(*arguments: str | Path, cwd: Path) -> subprocess.Popen[str]:
    """``python -m treadle ARGUMENTS`` (the installed entry points), the toy module importable."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "treadle", *map(str, arguments)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 120) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output
