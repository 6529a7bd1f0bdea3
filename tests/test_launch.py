"""Launching: ``treadle launch`` is torchrun with ``-m treadle run RUN.toml`` as the program,
and gives what plain ``torchrun`` gives; a Python script runs under torchrun as it is."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from treadle import ConfigError, cli, registry, testing
from treadle.plugins.commands import launch

ROOT = Path(__file__).parents[1]

RUN_FILE = """
model = "toy:model"
train_data = "toy:dataset"
loggers = []

[config]
max_steps = 4
batch_size = 4
grad_accum_steps = 2
log_every = 2
output_dir = "{output_dir}"

[strategy]
name = "ddp"
device = "cpu"
"""


def _needs_ddp_by_name() -> None:
    if "ddp" not in registry.entries("strategy"):
        pytest.skip("the 'ddp' entry point is not declared in pyproject.toml yet")


def test_torchrun_options_pass_through_and_run_options_follow_the_run_file() -> None:
    argv = launch.launch_argv(
        ["--nproc-per-node", "2", "--nnodes=2", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", "head:29400", "run.toml", "--set", "max_steps=5"]
    )  # fmt: skip
    assert argv == [
        "--nproc-per-node", "2", "--nnodes=2", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "head:29400",
        "-m", "treadle", "run", "run.toml", "--set", "max_steps=5",
    ]  # fmt: skip


def test_launch_refuses_another_program() -> None:
    with pytest.raises(ConfigError, match="--no-python"):
        launch.launch_argv(["--nproc-per-node", "2", "--no-python", "run.toml"])


def test_launch_hands_the_argv_to_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed import run as torchrun

    seen: list[list[str]] = []
    monkeypatch.setattr(torchrun, "main", lambda argv: seen.append(argv))
    assert cli.main(["launch", "--nproc-per-node", "2", "run.toml"]) == 0
    assert seen == [["--nproc-per-node", "2", "-m", "treadle", "run", "run.toml"]]


def _final_weights(output_dir: Path) -> dict[str, object]:
    return load_file(output_dir / "checkpoints" / "step-000004" / "model.safetensors")


def _launch(argv: list[str], tmp_path: Path) -> str:
    # CPU and gloo even where there is a GPU: two processes may share fewer devices
    env = {"CUDA_VISIBLE_DEVICES": ""}
    result = testing.run_isolated(argv, timeout=240, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


@pytest.mark.multiprocess
def test_treadle_launch_and_torchrun_give_the_same_weights(tmp_path: Path) -> None:
    _needs_ddp_by_name()
    outputs = {}
    for how in ("launch", "torchrun"):
        run_file = tmp_path / f"{how}.toml"
        run_file.write_text(RUN_FILE.format(output_dir=tmp_path / how))
        rendezvous = ["--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                      "--master-port", str(testing.free_port())]  # fmt: skip
        if how == "launch":
            argv = [sys.executable, "-m", "treadle", "launch", *rendezvous, str(run_file)]
        else:
            argv = [sys.executable, "-m", "torch.distributed.run", *rendezvous,
                    "-m", "treadle", "run", str(run_file)]  # fmt: skip
        outputs[how] = _launch(argv, tmp_path)
        # printed once, by the main process: 2 processes x 4 rows x 2 micro-batches
        assert outputs[how].count("global batch 16") == 1, outputs[how][-2000:]
    launched, torchrun = _final_weights(tmp_path / "launch"), _final_weights(tmp_path / "torchrun")
    assert launched.keys() == torchrun.keys()
    for name in launched:
        assert launched[name].equal(torchrun[name]), name


@pytest.mark.multiprocess
def test_a_failing_run_fails_the_launch(tmp_path: Path) -> None:
    run_file = tmp_path / "bad.toml"
    run_file.write_text(
        'model = "toy:model"\ntrain_data = "toy:dataset"\n[config]\nmax_stepz = 3\n'
    )
    result = testing.run_isolated(
        [sys.executable, "-m", "treadle", "launch", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(testing.free_port()), str(run_file)],
        timeout=120,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert "max_stepz" in result.stdout


@pytest.mark.multiprocess
def test_the_documented_torchrun_script_runs(tmp_path: Path) -> None:
    _needs_ddp_by_name()
    text = (ROOT / "docs" / "distributed.md").read_text()
    script = re.search(r"```python\n(# train\.py.*?)```", text, flags=re.S)
    assert script is not None, "docs/distributed.md lost its '# train.py' example"
    (tmp_path / "train.py").write_text(script.group(1))
    output = _launch(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(testing.free_port()), "train.py"],
        tmp_path,
    )  # fmt: skip
    assert "global batch" in output
    assert (tmp_path / "runs" / "ddp-example" / "checkpoints" / "latest").is_file()
