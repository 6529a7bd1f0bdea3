"""The ``deepspeed`` strategy and checkpoint format, on CPU with gloo and two processes.

Nothing here compiles a C++ extension: the strategy skips DeepSpeed's shared-memory
communication op, no test asks for ``DeepSpeedCPUAdam``, and the worker processes
(``ds_workers``) fail at once if anything tries. Builds would also go to a private
``TORCH_EXTENSIONS_DIR`` of this session, never the shared ``~/.cache/torch_extensions``, whose
lock a build killed by a timeout leaves behind for every later run to wait on.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

import ds_workers

import treadle
from treadle import checkpoint, registry, testing
from treadle.errors import ConfigError, TreadleError, UnknownNameError
from treadle.plugins.checkpoint.deepspeed_format import DeepSpeedFormat
from treadle.plugins.export import export
from treadle.plugins.strategies import deepspeed as deepspeed_strategy
from treadle.plugins.strategies.deepspeed import DeepSpeedStrategy

#: float32 sums taken in another order (reduction across ranks, partition flattening)
ATOL, RTOL = 1e-5, 1e-4
TIMEOUT = 420.0  # generous for a loaded 2-core machine; nothing is compiled


@pytest.fixture(scope="module", autouse=True)
def private_extensions_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """This module's processes build into (and lock) a directory of their own, if at all."""
    path = tmp_path_factory.mktemp("torch_extensions")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_EXTENSIONS_DIR", str(path))
        yield path


@pytest.mark.timeout(300)
def test_a_deepspeed_run_builds_no_extension(private_extensions_dir: Path) -> None:
    """DeepSpeed's torch backend JIT-compiles its shared-memory op when first made; the
    strategy skips it (ds_workers makes a build raise, and the build directory stays empty)."""
    built = testing.run_distributed(
        ds_workers.extension_builds, str(private_extensions_dir),
        world_size=1, init_process_group=False, timeout=TIMEOUT,
    )  # fmt: skip
    assert built == [[]]


def _reference(tmp_path: Path, **settings: Any) -> dict[str, torch.Tensor]:
    """One process, twice the per-device batch: the same global batch as two ranks."""
    return _reference_run(tmp_path, **settings)[0]


def _reference_run(tmp_path: Path, **settings: Any) -> tuple[dict[str, torch.Tensor], float]:
    settings = {**settings, "batch_size": 2 * settings.get("batch_size", 4)}
    with ds_workers.make_run("single", output_dir=str(tmp_path / "single"), **settings) as run:
        run.fit()
        return ds_workers.weights(run), ds_workers.evaluate(run)


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert actual.keys() == expected.keys()
    worst = 0.0
    for name in expected:
        diff = float((actual[name] - expected[name]).abs().max())
        worst = max(worst, diff)
        assert torch.allclose(actual[name], expected[name], atol=ATOL, rtol=RTOL), (name, diff)
    return worst


# ---------------------------------------------------------------------- two processes


@pytest.mark.multiprocess
def test_zero_1_2_3_reach_the_weights_of_one_process(tmp_path: Path) -> None:
    # 6 steps of 2 micro-batches of 4 rows on each of 2 ranks cross an epoch (4 steps of 64 rows)
    settings = {"max_steps": 6, "grad_accum_steps": 2}
    expected, expected_eval = _reference_run(tmp_path, **settings)
    results = testing.run_distributed(
        ds_workers.train,
        # the last: ZeRO 3 with the model built partitioned (zero.Init), as a run file does
        [{"stage": 1}, {"stage": 2}, {"stage": 3}, {"stage": 3, "init_context": True}],
        settings,
        str(tmp_path / "ds"),
        timeout=TIMEOUT,
    )
    for index, (stage, result) in enumerate(zip((1, 2, 3, 3), results[0], strict=True)):
        assert result["world_size"] == 2 and result["step"] == 6, stage
        _assert_close(result["weights"], expected)
        # evaluation through the engine (ZeRO 3 gathers parameters for it), over both ranks
        assert results[1][index]["eval"] == result["eval"]
        assert result["eval"] == pytest.approx(expected_eval, rel=RTOL, abs=ATOL), stage


@pytest.mark.multiprocess
def test_short_windows_tokens_mode_and_cpu_offload_match_one_process(tmp_path: Path) -> None:
    # 8 micro-batches per rank and epoch in windows of 3: the last window of an epoch has 2,
    # which the engine (dividing by gradient_accumulation_steps) must be corrected for
    mean = {"max_steps": 4, "grad_accum_steps": 3}
    tokens = {"max_steps": 3, "grad_accum_steps": 2, "tokens": True}
    expected_mean = _reference(tmp_path / "mean", **mean)
    expected_tokens = _reference(tmp_path / "tokens", **tokens)
    short, offloaded = testing.run_distributed(
        ds_workers.train,
        [{"stage": 2}, {"stage": 1, "offload_optimizer": "cpu", "cpu_adam": False}],
        mean,
        str(tmp_path / "mean"),
        timeout=TIMEOUT,
    )[0]
    _assert_close(short["weights"], expected_mean)
    _assert_close(offloaded["weights"], expected_mean)
    counted = testing.run_distributed(
        ds_workers.train, [{"stage": 3}], tokens, str(tmp_path / "tokens"), timeout=TIMEOUT
    )[0][0]
    _assert_close(counted["weights"], expected_tokens)


@pytest.mark.multiprocess
@pytest.mark.parametrize("options", [{"stage": 3}, {"stage": 2, "precision": "bf16"}])
def test_resume_from_a_deepspeed_checkpoint_continues_exactly_and_exports(
    tmp_path: Path, options: dict[str, Any], fake_dist: Any
) -> None:
    settings = {"max_steps": 6, "scheduler": {"name": "linear", "warmup_steps": 2}}
    results = testing.run_distributed(
        ds_workers.roundtrip, options, settings, str(tmp_path), 3, timeout=TIMEOUT
    )
    main = results[0]
    assert [r["begin"] for r in results] == [3, 3]
    assert main["resumed"].keys() == main["whole"].keys()
    for name in main["whole"]:  # on CPU a resumed run continues bit for bit
        assert torch.equal(main["resumed"][name], main["whole"][name]), name
    assert results[0]["lr"] == results[1]["lr"] == 0.0  # the schedule went on, to its end

    # DeepSpeed's files, every rank's partition, beside the kernel's own
    saved = Path(main["saved"])
    files = main["files"]
    assert "model/latest" in files and "state.json" in files and "scheduler.json" in files
    assert any("zero_pp_rank_1_" in f for f in files), files
    assert json.loads((saved / "optimizer.json").read_text())["tensors"] is False
    assert checkpoint.verify(saved) == []

    # consolidated in this process, without a process group: the fp32 weights at the save
    consolidated = DeepSpeedFormat().load_tensors(saved, "model")
    assert consolidated.keys() == main["at_stop"].keys()
    for name, tensor in consolidated.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, main["at_stop"][name]), name

    if "deepspeed" not in registry.entries("checkpoint"):  # until pyproject.toml declares it
        fake_dist(
            "treadle-deepspeed-entry-point",
            {"treadle.checkpoint": {"deepspeed": f"{DeepSpeedFormat.__module__}:DeepSpeedFormat"}},
        )
    out = export(saved, tmp_path / "export")
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == consolidated.keys()
    assert all(torch.equal(exported[k], consolidated[k]) for k in exported)
    treadle.load_weights(ds_workers.TinyModel(), saved)  # straight from the checkpoint too


@pytest.mark.multiprocess
def test_a_stop_on_one_rank_and_a_save_on_another_hold_for_all() -> None:
    strategy = functools.partial(DeepSpeedStrategy, device="cpu", stage=2)
    testing.check_agreed_stop(strategy, checkpoint=DeepSpeedFormat, timeout=TIMEOUT)


# ---------------------------------------------------------------------- composing, one process


def test_a_separate_precision_plugin_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="manages numeric precision itself"):
        treadle.Run(
            torch.nn.Linear(2, 1),
            [torch.ones(2, 2)],
            strategy=DeepSpeedStrategy(device="cpu"),
            precision="bf16-mixed",
            checkpoint=None,
        )


def test_a_whole_file_checkpoint_format_is_refused_when_the_run_saves(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="checkpoint='deepspeed'"):
        treadle.Run(
            torch.nn.Linear(2, 1),
            [torch.ones(2, 2)],
            strategy=DeepSpeedStrategy(device="cpu"),
            config=treadle.Config(output_dir=str(tmp_path)),
        )  # the default checkpoint, safetensors, and save_at_end=True


def test_the_deepspeed_format_needs_the_deepspeed_strategy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs strategy 'deepspeed'"):
        treadle.Run(torch.nn.Linear(2, 1), [torch.ones(2, 2)], checkpoint=DeepSpeedFormat())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stage": 4}, "use 0, 1, 2 or 3"),
        ({"offload_param": "cpu", "stage": 2}, "needs ZeRO stage 3"),
        ({"offload_optimizer": "disk"}, "use one of cpu, nvme"),
        ({"offload_optimizer": "nvme"}, "nvme_path"),
        ({"precision": "int8"}, "fp32, bf16, fp16"),
        ({"gradient_clipping": -1}, "positive number"),
        ({"stage": 1, "config": {"zero_optimization": {"stage": 3}}}, "give one of them"),
        ({"precision": "fp32", "config": {"bf16": {"enabled": True}}}, "give one of them"),
        ({"config": "/nonexistent/ds.json"}, "cannot read"),
    ],
)
def test_options_are_checked_when_composed(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DeepSpeedStrategy(device="cpu", **options)


class _Run:
    """What ``deepspeed_config`` reads of a run."""

    def __init__(self, **config: Any) -> None:
        self.config = treadle.Config(**config)
        self.train_data = torch.utils.data.DataLoader(list(range(8)), batch_size=4)


def test_the_deepspeed_config_merges_file_options_and_the_run(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": 3, "overlap_comm": False},
                "bf16": {"enabled": True},
                "communication_data_type": "fp32",
            }
        )
    )
    strategy = DeepSpeedStrategy(
        config=str(path), offload_optimizer="cpu", gradient_clipping=0.5, device="cpu"
    )
    config = strategy.deepspeed_config(_Run(grad_accum_steps=3))  # type: ignore[arg-type]
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 12  # one process here
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["overlap_comm"] is False
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["gradient_clipping"] == 0.5
    assert config["communication_data_type"] == "fp32"  # passed through unchanged
    # DeepSpeed clips at 1.0 by default; treadle clips only when asked
    assert DeepSpeedStrategy(device="cpu").deepspeed_config(_Run())["gradient_clipping"] == 0.0  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"gradient_accumulation_steps": 4}, "Config.grad_accum_steps"),
        ({"train_micro_batch_size_per_gpu": 2}, "per-device batch size"),
        ({"optimizer": {"type": "AdamW"}}, "optimizer="),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler="),
    ],
)
def test_config_sections_that_are_treadles_are_refused(
    config: dict[str, Any], message: str
) -> None:
    strategy = DeepSpeedStrategy(config=config, device="cpu")
    with pytest.raises(ConfigError, match=message):
        strategy.deepspeed_config(_Run(grad_accum_steps=2))  # type: ignore[arg-type]


def test_the_grad_clip_plugin_is_pointed_at_the_strategy_option() -> None:
    with pytest.raises(ConfigError, match="gradient_clipping"):
        DeepSpeedStrategy(device="cpu").clip_grad_norm([], 1.0)


def test_no_engine_before_the_optimizer_is_attached() -> None:
    with pytest.raises(TreadleError, match="no engine yet"):
        DeepSpeedStrategy(device="cpu").backward(torch.ones(()))


def test_the_strategy_is_found_by_name() -> None:
    if "deepspeed" not in registry.entries("strategy"):
        pytest.skip("the 'deepspeed' strategy entry point is not declared in pyproject.toml yet")
    run = treadle.Run(
        torch.nn.Linear(2, 1),
        [torch.ones(2, 2)],
        strategy={"name": "deepspeed", "stage": 1, "device": "cpu"},
        checkpoint=None,
    )
    assert isinstance(run.strategy, DeepSpeedStrategy) and run.strategy.stage == 1


class _Payload:
    """Unpickling it would run a command."""

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, ("echo unpickled > /dev/null",))


def test_a_checkpoint_file_with_code_in_it_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "global_step1").mkdir(parents=True)
    (folder / "latest").write_text("global_step1")
    torch.save(
        {"module": {"w": torch.ones(2)}, "payload": _Payload()},
        folder / "global_step1" / "mp_rank_00_model_states.pt",
    )
    with pytest.raises(TreadleError, match="refusing to unpickle"):
        DeepSpeedFormat().load_tensors(tmp_path, "model")
    import os

    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after the block


# ---------------------------------------------------------------------- the DeepSpeed launcher

LAUNCHED_RUN = """
model = "toy:model"
train_data = "toy:dataset"
loggers = []

[config]
max_steps = 4
batch_size = {batch_size}
grad_accum_steps = 2
log_every = 2
output_dir = "{output_dir}"
save_at_end = {save}

[strategy]
{strategy}

[checkpoint]
name = "{checkpoint}"
"""


def test_the_deepspeed_launcher_gets_its_options_and_treadle_run() -> None:
    from treadle.plugins.commands import launch

    launcher, rest = launch.split_launcher(
        ["--launcher", "deepspeed", "--num_gpus", "2", "--master_port", "29600", "run.toml",
         "--set", "max_steps=5"]
    )  # fmt: skip
    assert launcher == "deepspeed"
    assert deepspeed_strategy.launch_argv(rest) == [
        "--num_gpus", "2", "--master_port", "29600", "--no_local_rank", "--module",
        "treadle", "run", "run.toml", "--set", "max_steps=5",
    ]  # fmt: skip
    assert launch.split_launcher(["--launcher=torchrun", "run.toml"]) == ("torchrun", ["run.toml"])
    assert launch.split_launcher(["--nproc-per-node", "2", "run.toml"])[0] == "torchrun"
    # a launcher other than torchrun is a strategy's own: the kernel names none
    with pytest.raises(UnknownNameError, match="unknown strategy 'mpirun'"):
        launch._strategy_launch("mpirun", ["run.toml"])
    with pytest.raises(ConfigError, match="strategy 'ddp' has no launcher of its own"):
        launch._strategy_launch("ddp", ["run.toml"])
    with pytest.raises(ConfigError, match="--module and --no_python"):
        deepspeed_strategy.launch_argv(["--module", "run.toml"])


@pytest.mark.multiprocess
def test_treadle_launch_with_the_deepspeed_launcher(tmp_path: Path, fake_dist: Any) -> None:
    import sys

    from treadle.plugins.commands import runfile

    missing = {
        group: {"deepspeed": target}
        for group, target in (
            ("treadle.strategy", f"{DeepSpeedStrategy.__module__}:DeepSpeedStrategy"),
            ("treadle.checkpoint", f"{DeepSpeedFormat.__module__}:DeepSpeedFormat"),
        )
        if "deepspeed" not in registry.entries(group.removeprefix("treadle."))
    }
    if missing:  # until pyproject.toml declares them; the launched processes see this too
        fake_dist("treadle-deepspeed-entry-points", missing)
    reference = tmp_path / "single.toml"
    reference.write_text(
        LAUNCHED_RUN.format(batch_size=8, output_dir=tmp_path / "single", save="false",
                            strategy='name = "single"\ndevice = "cpu"', checkpoint="safetensors")
    )  # fmt: skip
    with runfile.build_run(reference) as run:
        run.fit()
        expected = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    launched = tmp_path / "deepspeed.toml"
    launched.write_text(
        LAUNCHED_RUN.format(batch_size=4, output_dir=tmp_path / "ds", save="true",
                            strategy='name = "deepspeed"\nstage = 1\ndevice = "cpu"',
                            checkpoint="deepspeed")
    )  # fmt: skip
    result = testing.run_isolated(
        [sys.executable, "-m", "treadle", "launch", "--launcher", "deepspeed", "--num_gpus", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(testing.free_port()), str(launched)],
        timeout=TIMEOUT,
        cwd=tmp_path,
        env={"CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    assert result.stdout.count("global batch 16 = 2 process(es)") == 1, result.stdout[-3000:]
    weights = DeepSpeedFormat().load_tensors(
        tmp_path / "ds" / "checkpoints" / "step-000004", "model"
    )
    _assert_close(weights, expected)


def test_without_deepspeed_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from treadle.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match=r"treadle\[deepspeed\]"):
        DeepSpeedStrategy(device="cpu")


def test_a_config_that_disagrees_with_the_run_fails_when_composed() -> None:
    with pytest.raises(ConfigError, match=r"Config\.grad_accum_steps"):
        treadle.Run(
            torch.nn.Linear(2, 1),
            [torch.ones(2, 2)],
            strategy=DeepSpeedStrategy(config={"gradient_accumulation_steps": 8}, device="cpu"),
            config=treadle.Config(grad_accum_steps=2),
            checkpoint=None,
        )
