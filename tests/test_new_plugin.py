"""``treadle new-plugin``: a package of each kind, installed for real (not editable) into a fresh
virtual environment, passes its own generated tests, and ``treadle plugins`` lists it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from treadle import ConfigError
from treadle.plugins.authoring import new_plugin
from treadle.plugins.authoring.scaffold import KINDS, create, treadle_requirement

ROOT = Path(__file__).parents[1]


def _venv(path: Path) -> Path:
    """A venv that sees this one's packages (torch, the editable treadle) through a .pth file:
    ``--system-site-packages`` alone would show the base interpreter's, not this venv's."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)],
        check=True,
        timeout=120,
    )
    purelib = Path(
        subprocess.run(
            [str(path / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout.strip()
    )  # fmt: skip
    ours = sysconfig.get_paths()["purelib"]
    (purelib / "_dev_venv.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return path / "bin" / "python"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_package_of_each_kind_installs_and_passes_its_own_tests(tmp_path: Path) -> None:
    packages = tmp_path / "packages"
    for kind in KINDS:
        assert new_plugin([kind, f"acme-{kind}", "--dir", str(packages)]) == 0
    python = _venv(tmp_path / "venv")
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH")
    installed = subprocess.run(
        [
            sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
            "--no-build-isolation", "--no-index", "-q",
            *(str(p) for p in sorted(packages.iterdir())),
        ],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # not editable: the installed copies are in the venv, not in the source folders
    where = subprocess.run(
        [str(python), "-c", "import treadle_acme_logger as m; print(m.__file__)"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert str(tmp_path / "venv") in where.stdout, where.stdout + where.stderr

    # from a folder outside every source tree, so only the installed packages are importable
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tests = [str(packages / f"treadle-acme-{kind}" / "tests") for kind in KINDS]
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(elsewhere),
         *tests],
        capture_output=True, text=True, timeout=500, env=env, cwd=elsewhere,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout

    listed = subprocess.run(
        [str(python), "-m", "treadle", "plugins", "--json"],
        capture_output=True, text=True, timeout=120, env=env, cwd=elsewhere,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    entries = {(e["kind"], e["name"]): e for e in json.loads(listed.stdout)}
    for kind, info in KINDS.items():
        entry = entries[(info.group.removeprefix("treadle."), f"acme-{kind}")]
        assert entry["distribution"] == f"treadle-acme-{kind}"
        assert entry["version"] == "0.1.0"


def test_the_package_layout_and_requirement(tmp_path: Path) -> None:
    root = create("logger", "acme-sink", tmp_path)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert names == [
        ".github/workflows/publish.yml",
        "README.md",
        "pyproject.toml",
        "src/treadle_acme_sink/__init__.py",
        "src/treadle_acme_sink/py.typed",
        "tests/test_acme_sink.py",
    ]
    pyproject = (root / "pyproject.toml").read_text()
    import treadle

    major, minor = treadle.__version__.split(".")[:2]
    assert treadle_requirement() == f"treadle>={major}.{minor}"
    assert f'dependencies = ["treadle>={major}.{minor}"]' in pyproject
    assert '[project.entry-points."treadle.logger"]' in pyproject
    assert 'acme-sink = "treadle_acme_sink:AcmeSink"' in pyproject
    assert 'test = ["pytest>=8"]' in pyproject


def test_generated_methods_follow_the_real_interfaces(tmp_path: Path) -> None:
    import inspect

    from treadle import Strategy

    module = create("strategy", "acme-dist", tmp_path) / "src/treadle_acme_dist/__init__.py"
    text = module.read_text()
    for name, function in vars(Strategy).items():
        if inspect.isfunction(function) and not name.startswith("_"):
            assert f"    def {name}(" in text, name
    hooks = create("callback", "acme-cb", tmp_path) / "src/treadle_acme_cb/__init__.py"
    text = hooks.read_text()
    assert "def on_step_end(self, run: Run, loss: torch.Tensor) -> None:" in text
    assert "#   on_before_optimizer_step(run, optimizer)" in text
    assert "#   compute_loss(run, model, batch)  [provider]" in text


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["widget", "acme"], "unknown plugin kind 'widget'; kinds are callback, strategy"),
        (["logger", "Acme_Sink"], "plugin name 'Acme_Sink' is not allowed"),
        (["logger", "treadle-sink"], "leave out 'treadle-'"),
        (["logger", "class"], "is a Python keyword"),
    ],
)
def test_bad_kind_or_name_is_a_clear_error(
    tmp_path: Path, arguments: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        new_plugin([*arguments, "--dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_an_existing_folder_needs_force(tmp_path: Path) -> None:
    root = create("callback", "acme-cb", tmp_path)
    (root / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match=r"already exists.*--force"):
        new_plugin(["callback", "acme-cb", "--dir", str(tmp_path)])
    assert (root / "mine.txt").exists()
    assert new_plugin(["callback", "acme-cb", "--dir", str(tmp_path), "--force"]) == 0
    assert not (root / "mine.txt").exists()


@pytest.mark.timeout(120)
def test_the_treadle_command_runs_it(tmp_path: Path) -> None:
    from treadle import cli, registry

    if "new-plugin" not in registry.entries("command"):
        pytest.skip("the treadle.command entry point is not installed: pip install -e . again")
    assert cli.main(["new-plugin", "optimizer", "acme-opt", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "treadle-acme-opt" / "pyproject.toml").is_file()
    assert cli.main(["new-plugin", "optimizer", "acme-opt", "--dir", str(tmp_path)]) == 2
