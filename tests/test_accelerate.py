"""The ``accelerate`` strategy: two CPU processes (MULTI_CPU over gloo) give DDP's weights, under
the torch.distributed environment, ``torchrun`` and ``accelerate launch`` alike."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("accelerate", reason="the accelerate extra is not installed")

import accel_workers
from safetensors.torch import load_file

import treadle
from treadle import registry, testing
from treadle.errors import ConfigError
from treadle.plugins.strategies.accelerate import AccelerateStrategy

FIXTURES = Path(accel_workers.__file__).parent
TIMEOUT = 240.0


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:  # the same DDP underneath: the same sums in the same order
        assert torch.equal(a[name], b[name]), (name, float((a[name] - b[name]).abs().max()))


def _launched(argv: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> str:
    result = testing.run_isolated(
        argv, timeout=TIMEOUT, cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "", **(env or {})}
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


@pytest.mark.multiprocess
def test_two_cpu_processes_reach_the_weights_of_ddp_however_started(tmp_path: Path) -> None:
    ddp = testing.run_distributed(
        accel_workers.train, "ddp", {}, str(tmp_path / "ddp"), timeout=TIMEOUT
    )[0]["weights"]
    # the torch.distributed environment (what torchrun sets): Accelerate joins the group itself
    accelerated = testing.run_distributed(
        accel_workers.train,
        "accelerate",
        {},
        str(tmp_path / "accelerate"),
        init_process_group=False,
        timeout=TIMEOUT,
    )
    assert [r["kind"] for r in accelerated] == ["DistributedType.MULTI_CPU"] * 2
    assert [r["world_size"] for r in accelerated] == [2, 2]
    _equal(accelerated[0]["weights"], ddp)

    script = str(FIXTURES / "accel_workers.py")
    for how in ("torchrun", "accelerate-launch"):
        out = str(tmp_path / f"{how}.safetensors")
        port = str(testing.free_port())
        if how == "torchrun":
            argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-addr", "127.0.0.1", "--master-port", port,
                    script, "accelerate", out]  # fmt: skip
            stdout = _launched(argv, tmp_path)
        else:
            # two processes on CPU without MPI: Accelerate's multi-GPU (torchrun) launcher with
            # ACCELERATE_USE_CPU=1 (`--cpu` would choose its one-process/MPI launcher)
            argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                    "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no", "--main_process_port", port,
                    script, "accelerate", out]  # fmt: skip
            stdout = _launched(argv, tmp_path, {"ACCELERATE_USE_CPU": "1"})
        assert stdout.count("MULTI_CPU on 2 processes") == 2, stdout[-3000:]
        _equal(load_file(out), ddp)


@pytest.mark.multiprocess
def test_processes_accelerate_does_not_join_are_an_error() -> None:
    messages = testing.run_distributed(
        accel_workers.unjoined,
        init_process_group=False,
        env={"CUDA_VISIBLE_DEVICES": ""},
        timeout=TIMEOUT,
    )
    for message in messages:
        assert "2 processes were started, but Accelerate runs as 1" in message
        assert "cpu=true" in message


@pytest.mark.multiprocess
def test_resume_continues_exactly() -> None:
    # three runs in the same processes: each builds a new Accelerator on the same group
    testing.check_checkpoint_roundtrip(
        functools.partial(AccelerateStrategy, cpu=True), timeout=TIMEOUT
    )


# ---------------------------------------------------------------------- composing, one process


def test_a_separate_precision_plugin_is_refused() -> None:
    with pytest.raises(ConfigError, match="manages numeric precision itself"):
        treadle.Run(
            torch.nn.Linear(2, 1),
            [torch.ones(2, 2)],
            strategy=AccelerateStrategy(cpu=True),
            precision="bf16-mixed",
            checkpoint=None,
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mixed_precision": "fp64"}, "use one of no, fp16, bf16"),
        ({"accelerator_options": {"gradient_accumulation_steps": 4}}, "Config.grad_accum_steps"),
        ({"accelerator_options": {"log_with": "wandb"}}, "treadle's loggers"),
        ({"cpu": "yes"}, "true or false"),
        ({"config_file": "/nonexistent.yaml"}, "does not exist"),
    ],
)
def test_options_are_checked_when_composed(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AccelerateStrategy(**options)


def test_an_accelerate_config_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "accelerate.yaml"
    path.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\n"
        "mixed_precision: bf16\nuse_cpu: true\nnum_processes: 2\n"
    )
    strategy = AccelerateStrategy(config_file=str(path))
    assert strategy.accelerator_options == {"mixed_precision": "bf16", "cpu": True}
    path.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n")
    with pytest.raises(ConfigError, match="strategy 'deepspeed' instead"):
        AccelerateStrategy(config_file=str(path))


def test_one_process_trains_and_the_accelerator_is_released(tmp_path: Path) -> None:
    config = treadle.Config(max_steps=2, output_dir=str(tmp_path), save_at_end=False)
    for _ in range(2):  # a second run in the process builds its own Accelerator
        run = treadle.Run(
            torch.nn.Linear(2, 1),
            [torch.ones(2, 2)],
            loss_fn=lambda out, batch: out.pow(2).mean(),
            strategy=AccelerateStrategy(cpu=True, mixed_precision="bf16"),
            config=config,
            loggers=[],
        )
        with run:
            run.fit()
            assert run.strategy.accelerator.mixed_precision == "bf16"
            # Accelerate's autocast computes in bf16; the weights stay float32
            assert run.model.weight.dtype == torch.float32
        assert run.state.step == 2


def test_the_strategy_is_found_by_name() -> None:
    if "accelerate" not in registry.entries("strategy"):
        pytest.skip("the 'accelerate' strategy entry point is not declared in pyproject.toml yet")
    run = treadle.Run(
        torch.nn.Linear(2, 1), [torch.ones(2, 2)], strategy={"name": "accelerate", "cpu": True}
    )
    assert isinstance(run.strategy, AccelerateStrategy)


def test_without_accelerate_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from treadle.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match=r"treadle\[accelerate\]"):
        AccelerateStrategy()
