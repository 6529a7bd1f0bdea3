"""The built wheel holds the kernel as ``treadle``, the plugins as ``treadle.plugins``, the
entry points and ``py.typed``. (``nox -s wheel`` also installs it in a fresh venv and runs it.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_every_plugin_package_is_listed_for_the_build() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = (
        {"treadle"}
        | {
            "treadle." + str(init.parent.relative_to(ROOT)).replace("/", ".")
            for init in (ROOT / "plugins").rglob("__init__.py")
        }
        | {
            "treadle." + str(init.parent.relative_to(ROOT / "core")).replace("/", ".")
            for init in (ROOT / "core").glob("*/__init__.py")
        }
    )
    assert found == listed


@pytest.mark.slow
def test_wheel_contents(tmp_path: Path) -> None:
    # build from a copy: setuptools writes treadle.egg-info next to the sources, and one in the
    # checkout would shadow the installed metadata (and its entry points) for `python -m`
    source = tmp_path / "src"
    source.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(ROOT / name, source / name)
    for name in ["core", "plugins"]:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("treadle-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in [
        "treadle/__init__.py",
        "treadle/loop.py",
        "treadle/py.typed",
        "treadle/plugins/strategies/single.py",
        "treadle/plugins/loggers/console.py",
        "treadle/plugins/optimizers.py",
        "treadle/plugins/commands/run.py",
    ]:
        assert required in names, required
    assert not [n for n in names if n.startswith(("core/", "plugins/", "tests/"))]
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
        .decode()
    )
    for group in [
        "treadle.strategy",
        "treadle.precision",
        "treadle.optimizer",
        "treadle.scheduler",
        "treadle.logger",
        "treadle.checkpoint",
        "treadle.plugin",
        "treadle.command",
        "console_scripts",
    ]:
        assert f"[{group}]" in entry_points, group
