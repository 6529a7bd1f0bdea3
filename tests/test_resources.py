"""``throughput``, ``memory`` and ``lr-monitor``: what they add to the training log, exactly."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import toy

import treadle
from treadle.errors import ConfigError
from treadle.plugins.callbacks import throughput as throughput_module
from treadle.plugins.callbacks.lr_monitor import LearningRateMonitor
from treadle.plugins.callbacks.memory import Memory
from treadle.plugins.callbacks.throughput import Throughput, estimate_flops_per_token
from treadle.plugins.loggers.jsonl import JsonlLogger


class History:
    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    @treadle.hookimpl
    def on_log(self, metrics: dict[str, float]) -> None:
        self.logged.append(dict(metrics))

    def training(self) -> list[dict[str, float]]:
        return [m for m in self.logged if "loss" in m]

    def evaluations(self) -> list[dict[str, float]]:
        return [m for m in self.logged if "eval/loss" in m]


class Clock:
    """A fake ``time`` for the throughput plugin: a training step lasts 1 s, an eval batch 100 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    @treadle.hookimpl
    def on_step_end(self) -> None:
        self.now += 1.0

    @treadle.hookimpl
    def on_eval_step_end(self) -> None:
        self.now += 100.0


def _run(tmp_path: Path, plugins: list[Any], **options: Any) -> treadle.Run:
    torch.manual_seed(0)
    config = {"max_steps": 6, "log_every": 3, "eval_every": 2, "output_dir": str(tmp_path)}
    config |= options.pop("config", {})
    options = {"optimizer": {"name": "sgd", "lr": 0.1}, "loggers": [], "checkpoint": None} | options
    return treadle.Run(
        toy.model(),
        toy.train_data(n=64, batch_size=8),
        eval_data=toy.train_data(n=16, batch_size=8),
        config=treadle.Config(**config),
        plugins=plugins,
        **options,
    )


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(throughput_module, "time", SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


# ------------------------------------------------------------------ throughput


def test_throughput_rates_exclude_evaluation_time(tmp_path: Path, clock: Clock) -> None:
    history = History()
    plugin = Throughput(peak_flops=1e6)
    run = _run(tmp_path, [plugin, clock, history])
    run.fit()
    flops_per_sample = estimate_flops_per_token(run.model)
    assert flops_per_sample == 6 * sum(p.numel() for p in run.model.parameters())
    training = history.training()
    assert [m["step"] for m in training] == [3, 6]
    for record in training:
        # 3 steps of 1 s, 8 samples each; the evaluations' 200 s in between are not counted
        assert record["throughput/step_time_s"] == 1.0
        assert record["throughput/samples_per_s"] == 8.0
        assert "throughput/tokens_per_s" not in record  # no token count was given
        assert record["throughput/flops_per_s"] == 8.0 * flops_per_sample
        assert record["throughput/mfu"] == 8.0 * flops_per_sample / 1e6
    assert all(not any(k.startswith("throughput/") for k in m) for m in history.evaluations())
    assert run.state.last_metrics["throughput/step_time_s"] == 1.0


@pytest.mark.parametrize(
    ("options", "tokens_per_sample"),
    [
        ({"count_tokens": lambda batch: batch["x"].numel()}, 4),  # x is (8, 4)
        ({"count_tokens": lambda batch: torch.tensor(batch["x"].numel())}, 4),  # on device
        ({"tokens_per_sample": 5}, 5),
    ],
)
def test_throughput_tokens(
    tmp_path: Path, clock: Clock, options: dict[str, Any], tokens_per_sample: int
) -> None:
    history = History()
    run = _run(tmp_path, [Throughput(flops_per_token=10.0, **options), clock, history])
    run.fit()
    for record in history.training():
        assert record["throughput/tokens_per_s"] == 8.0 * tokens_per_sample
        assert record["throughput/flops_per_s"] == 8.0 * tokens_per_sample * 10.0
        assert "throughput/mfu" not in record  # no peak was stated


def test_throughput_uses_the_kernels_scored_tokens(tmp_path: Path, clock: Clock) -> None:
    def summed(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> Any:
        errors = (outputs["prediction"] - batch["y"]).square()
        return treadle.LossSum(errors.sum(), torch.tensor(errors.numel()))

    history = History()
    run = _run(
        tmp_path, [Throughput(estimate_flops=False), clock, history],
        config={"loss_normalization": "tokens"}, loss_fn=summed,
    )  # fmt: skip
    run.fit()
    for record in history.training():
        assert record["throughput/tokens_per_s"] == 8.0
        assert "throughput/flops_per_s" not in record


def test_throughput_costs_nothing_per_step_without_a_token_counter(tmp_path: Path) -> None:
    run = _run(tmp_path, [Throughput()])
    run.fit()
    per_step = ("on_step_begin", "on_step_end", "on_micro_step_begin", "on_micro_step_end")
    for hook in per_step:
        owners = [i.plugin_name for i in getattr(run.plugin_manager.hook, hook).get_hookimpls()]
        assert not any(name.startswith("throughput") for name in owners), hook
    counted = _run(tmp_path / "b", [Throughput(count_tokens=lambda b: 1)])
    counted.fit()
    owners = [
        i.plugin_name for i in counted.plugin_manager.hook.on_micro_step_begin.get_hookimpls()
    ]
    assert owners == ["throughput-tokens"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"peak_flops": 0}, r"peak_flops = 0 is not allowed"),
        ({"flops_per_token": -1.0}, r"flops_per_token = -1.0 is not allowed"),
        ({"tokens_per_sample": 0}, r"tokens_per_sample = 0 is not allowed"),
        ({"count_tokens": 3}, r"count_tokens = 3 is not allowed"),
    ],
)
def test_throughput_invalid_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Throughput(**options)


# ------------------------------------------------------------------ memory


def test_memory_adds_host_figures_to_training_logs(tmp_path: Path) -> None:
    history = History()
    run = _run(tmp_path, [Memory(), history])
    run.fit()
    for record in history.training():
        assert record["memory/host_peak_rss_mb"] >= record["memory/host_rss_mb"] > 1.0
        assert not any(key.startswith("memory/cpu") for key in record)  # no device on CPU
    assert all("memory/host_rss_mb" not in m for m in history.evaluations())


@pytest.mark.cuda
def test_memory_reports_the_interval_peak_on_cuda(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from treadle.plugins.strategies.single import SingleDevice

    class Spike:  # holds 64 MiB for a moment in step 2 only
        @treadle.hookimpl
        def on_step_end(self, run: treadle.Run) -> None:
            if run.state.step == 2:
                spike = torch.empty(64 * 2**20, dtype=torch.uint8, device=run.device)
                del spike

    history = History()
    run = _run(
        tmp_path, [Memory(), Spike(), history], config={"log_every": 2, "eval_every": None},
        strategy=SingleDevice(device=f"cuda:{torch.cuda.current_device()}"),
    )  # fmt: skip
    run.fit()
    peaks = [m["memory/cuda_peak_allocated_mb"] for m in history.training()]
    # the baseline (weights, cuBLAS workspace) is the same in every interval; the spike is in
    # the first one only, because the peak counter is reset after each reading
    assert peaks[0] >= peaks[1] + 63  # 64 MiB, less what the baseline had freed meanwhile
    assert peaks[2] == pytest.approx(peaks[1], abs=1.0)
    assert all(m["memory/cuda_reserved_mb"] > 0 for m in history.training())


# ------------------------------------------------------------------ learning rates


def test_lr_monitor_logs_every_group_after_the_scheduler(tmp_path: Path) -> None:
    def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
        first, last = model.net[0], model.net[3]
        return torch.optim.SGD(
            [{"params": first.parameters(), "name": "first"}, {"params": last.parameters()}],
            lr=0.1, momentum=0.9,
        )  # fmt: skip

    def scheduler(optim: torch.optim.Optimizer, total_steps: int) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0 / (1 + step))

    history = History()
    run = _run(
        tmp_path, [LearningRateMonitor(momentum=True, weight_decay=True), history],
        optimizer=optimizer, scheduler=scheduler,
    )  # fmt: skip
    run.fit()
    for record in history.training():
        expected = 0.1 / (1 + record["step"])
        assert record["lr/first"] == pytest.approx(expected)
        assert record["lr/group1"] == pytest.approx(expected)
        assert record["momentum/first"] == 0.9 and record["weight_decay/group1"] == 0.0
    assert all("lr/first" not in m for m in history.evaluations())


def test_lr_monitor_reads_adam_betas_as_momentum(tmp_path: Path) -> None:
    history = History()
    run = _run(tmp_path, [LearningRateMonitor(momentum=True), history], optimizer="adam")
    run.fit()
    record = history.training()[-1]
    groups = [k.removeprefix("momentum/") for k in record if k.startswith("momentum/")]
    assert groups and all(record[f"momentum/{g}"] == 0.9 for g in groups)


# ------------------------------------------------------------------ together, in a logger


def test_all_three_land_in_the_same_logged_record(tmp_path: Path) -> None:
    run = _run(tmp_path, [Throughput(), Memory(), LearningRateMonitor()], loggers=[JsonlLogger()])
    run.fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    training = [line for line in lines if "loss" in line]
    assert [line["step"] for line in training] == [3, 6]
    for line in training:
        assert {"throughput/samples_per_s", "memory/host_rss_mb", "lr/group0"} <= set(line)
    assert len(lines) == len(training) + 3  # one line per evaluation (steps 2, 4, 6)
