"""A third-party plugin distribution, really installed, is used by name with no import."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "treadle-acme-test"
version = "0.3.0"

[project.entry-points."treadle.plugin"]
acme-counter = "treadle_acme_test:CounterPlugin"

[project.entry-points."treadle.logger"]
acme-logger = "treadle_acme_test:ListLogger"
"""

MODULE = """
import json
import treadle


class CounterPlugin:
    def __init__(self, every: int = 1):
        self.every = every
        self.steps = []

    @treadle.hookimpl
    def on_step_end(self, run):
        if run.state.step % self.every == 0:
            self.steps.append(run.state.step)

    @treadle.hookimpl
    def on_fit_end(self, run):
        (run.output_dir / "acme-counter.json").write_text(json.dumps(self.steps))


class ListLogger(treadle.Logger):
    name = "acme-logger"

    def start(self, run):
        self.path = run.output_dir / "acme-log.jsonl"
        self.handle = open(self.path, "w")

    def log(self, metrics, step):
        self.handle.write(json.dumps({"step": step, "loss": metrics.get("loss")}) + "\\n")

    def finish(self):
        self.handle.close()
"""

# The user's script: names the plugins by string, imports nothing of theirs.
USER_SCRIPT = """
import sys, toy, treadle
run = treadle.Run(
    toy.model(), toy.train_data(),
    config=treadle.Config(max_steps=6, log_every=2, output_dir=sys.argv[1]),
    loggers=["acme-logger"], checkpoint=None,
    plugins=[{"name": "acme-counter", "every": 3}],
)
run.fit()
print("OK")
"""


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _run_user_script(tmp_path: Path, out: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    fixtures = str(Path(__file__).parent / "fixtures")
    return subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": fixtures, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_installed_distribution_is_used_by_name_and_uninstall_removes_it(tmp_path: Path) -> None:
    project = tmp_path / "treadle-acme-test"
    (project / "treadle_acme_test").mkdir(parents=True)
    (project / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (project / "treadle_acme_test" / "__init__.py").write_text(textwrap.dedent(MODULE))
    installed = _pip("install", "--no-deps", "--no-build-isolation", str(project))
    assert installed.returncode == 0, installed.stderr
    try:
        out = tmp_path / "out"
        result = _run_user_script(tmp_path, out)
        assert result.returncode == 0, result.stderr
        assert "OK" in result.stdout
        assert (out / "acme-counter.json").read_text() == "[3, 6]"
        logged = (out / "acme-log.jsonl").read_text().splitlines()
        assert [line.split(",")[0] for line in logged] == ['{"step": 2', '{"step": 4', '{"step": 6']
    finally:
        removed = _pip("uninstall", "-y", "treadle-acme-test")
    assert removed.returncode == 0, removed.stderr
    result = _run_user_script(tmp_path, tmp_path / "out2")
    assert result.returncode != 0
    assert "unknown logger 'acme-logger'" in result.stderr
    assert "Installed logger names:" in result.stderr and "console" in result.stderr
