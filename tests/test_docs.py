"""The README's commands and examples are the ones that work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    test_command = _blocks("bash")[1].strip()
    assert "pytest" in test_command and "-c constraints.txt" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_every_install_command_uses_the_constraints_file() -> None:
    commands = "\n".join(_blocks("bash"))
    for text in [commands, (ROOT / "noxfile.py").read_text(), (ROOT / ".ci" / "run").read_text()]:
        for line in text.splitlines():
            if "pip install" in line:
                assert "-c constraints.txt" in line, line
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    assert "session.install(*CONSTRAINTS" in (ROOT / "noxfile.py").read_text()


def test_readme_python_example_runs(tmp_path: Path) -> None:
    example = _blocks("python")[0]
    script = tmp_path / "example.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + example)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "eval/loss" in result.stdout
    assert (tmp_path / "runs" / "readme" / "metrics.jsonl").is_file()
    assert (tmp_path / "runs" / "readme" / "checkpoints" / "latest").is_file()
