"""``fp16-mixed`` with ``fsdp``: an inf in one rank's gradient shard makes every rank skip.

``GradScaler.unscale_`` checks the gradients a rank holds; under FSDP2 those are DTensor shards,
and torch reduces the check over the mesh, so ranks agree. The scaler comes from
``Strategy.grad_scaler``: a strategy with other gradient layouts supplies its own.
fp16 autocast and ``torch.amp.GradScaler`` run on CPU, so this runs on two gloo processes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import treadle
from treadle import testing
from treadle.plugins.precision import FP16Mixed
from treadle.plugins.strategies.fsdp import FSDPStrategy
from treadle.plugins.strategies.single import SingleDevice
from treadle.testing import TinyModel, tiny_data

PLANT_AT = 1  # run.state.step while the second step is computed
STEPS = 4


class PlantInf:
    """On rank 1 only, an inf in this rank's shard of the first gradient, before unscaling;
    records this rank's shards and gradients around every step."""

    def __init__(self) -> None:
        self.shards: list[dict[str, torch.Tensor]] = []
        self.finite_here: list[bool] = []
        self.scales: list[float] = []

    def _record(self, run: treadle.Run) -> None:
        self.shards.append(
            {n: p.to_local().detach().clone() for n, p in run.model.named_parameters()}
        )

    @treadle.hookimpl
    def on_fit_begin(self, run: treadle.Run) -> None:
        self._record(run)

    @treadle.hookimpl
    def on_after_backward(self, run: treadle.Run) -> None:
        if run.state.step != PLANT_AT:
            return
        grad = next(run.model.parameters()).grad
        if run.strategy.rank == 1:
            grad.to_local()[0, 0] = float("inf")  # a scaled gradient: unscale_ has not run
        self.finite_here.append(
            all(bool(torch.isfinite(p.grad.to_local()).all()) for p in run.model.parameters())
        )

    @treadle.hookimpl
    def on_step_end(self, run: treadle.Run) -> None:
        self._record(run)
        self.scales.append(run.precision.scale)


def plant_inf_on_rank_one(output_dir: str) -> dict[str, Any]:
    treadle.seed_everything(0)
    plant = PlantInf()
    run = treadle.Run(
        TinyModel(),
        train_data=DataLoader(tiny_data(), batch_size=4, shuffle=True),
        config=treadle.Config(max_steps=STEPS, output_dir=output_dir, save_at_end=False),
        strategy=FSDPStrategy(device="cpu"),
        precision=FP16Mixed(init_scale=1024.0),
        optimizer={"name": "adamw", "lr": 1e-2},
        plugins=[plant],
        loggers=[],
    )
    with run:
        run.fit()
        return {
            "skipped": run.state.skipped_steps,
            "step": run.state.step,
            "scales": plant.scales,
            "finite_here": plant.finite_here,
            "shards": plant.shards,
            "scaler": type(run.precision.scaler).__name__,
        }


@pytest.mark.multiprocess
def test_an_inf_in_one_ranks_shard_skips_the_step_on_every_rank(tmp_path) -> None:
    ranks = testing.run_distributed(plant_inf_on_rank_one, str(tmp_path), world_size=2)
    zero, one = ranks
    # the inf was only in rank 1's shard: rank 0's own gradients were finite
    assert zero["finite_here"] == [True] and one["finite_here"] == [False]
    # ... yet both skipped that step, halved the scale, and went on alike
    assert zero["skipped"] == one["skipped"] == 1
    assert zero["step"] == one["step"] == STEPS
    assert zero["scales"] == one["scales"] == [1024.0, 512.0, 512.0, 512.0]
    assert zero["scaler"] == "GradScaler"
    for rank in ranks:
        shards = rank["shards"]  # before the first step, then after each step
        for name in shards[0]:
            assert torch.equal(shards[PLANT_AT + 1][name], shards[PLANT_AT][name]), name
        for step in (0, 2, 3):  # the other steps moved this rank's shard of the first weight
            assert not torch.equal(shards[step + 1]["embed.weight"], shards[step]["embed.weight"])
        assert all(bool(torch.isfinite(t).all()) for t in shards[-1].values())


# ------------------------------------------------------------------ the strategy makes the scaler


class MarkedScaler(torch.amp.GradScaler):
    pass


class ScalingStrategy(SingleDevice):
    def __init__(self) -> None:
        super().__init__("cpu")
        self.options: dict[str, Any] = {}

    def grad_scaler(self, **options: Any) -> torch.amp.GradScaler:
        self.options = options
        return MarkedScaler(self.device.type, **options)


def test_fp16_mixed_takes_its_scaler_from_the_strategy() -> None:
    strategy = ScalingStrategy()
    run = treadle.Run(
        TinyModel(),
        train_data=DataLoader(tiny_data(), batch_size=4),
        config=treadle.Config(max_steps=1, output_dir="runs/unused", save_at_end=False),
        strategy=strategy,
        precision=FP16Mixed(init_scale=64.0, growth_interval=7),
        loggers=[],
    )
    run.fit()
    assert isinstance(run.precision.scaler, MarkedScaler)
    assert strategy.options == {
        "init_scale": 64.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 7,
    }


def test_the_base_strategy_scaler_is_torchs_on_its_device() -> None:
    scaler = SingleDevice("cpu").grad_scaler(init_scale=8.0)
    assert type(scaler) is torch.amp.GradScaler
    assert scaler.get_scale() == 8.0 and scaler._device == "cpu"


def test_cpu_offload_on_a_gpu_adds_a_cpu_backend() -> None:
    """Offloaded gradient shards live in CPU memory: their inf check and norm need gloo."""
    cuda = torch.device("cuda", 0)
    assert FSDPStrategy(device="cpu", cpu_offload=True)._backend_for(cuda) == "cuda:nccl,cpu:gloo"
    assert FSDPStrategy(device="cpu")._backend_for(cuda) == "nccl"
    assert FSDPStrategy(device="cpu", cpu_offload=True)._backend_for(torch.device("cpu")) == "gloo"
    explicit = FSDPStrategy(device="cpu", cpu_offload=True, backend="nccl")
    assert explicit._backend_for(cuda) == "nccl"  # an explicit backend is the user's choice
