"""``ddp`` and ``fsdp`` with NCCL on one GPU, bf16 included: a world of one process made without
a launcher (a file:// store). Skipped without CUDA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import treadle
from treadle.plugins.checkpoint.dcp_format import DCPFormat
from treadle.plugins.strategies.ddp import DDPStrategy
from treadle.plugins.strategies.fsdp import FSDPStrategy
from treadle.plugins.strategies.single import SingleDevice
from treadle.testing import TinyModel, tiny_data

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def nccl_group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group(
        "nccl",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        device_id=torch.device("cuda", 0),
    )
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _Losses:
    def __init__(self) -> None:
        self.values: list[float] = []

    @treadle.hookimpl
    def on_log(self, metrics: dict[str, float]) -> None:
        if "loss" in metrics:
            self.values.append(float(metrics["loss"]))


def _fit(
    strategy: Any,
    output_dir: Path,
    *,
    precision: str | None = None,
    checkpoint: Any = None,
    max_steps: int = 8,
    resume: str | None = None,
    model_seed: int = 0,
) -> tuple[dict[str, torch.Tensor], list[float], treadle.Run]:
    torch.manual_seed(model_seed)
    losses = _Losses()
    run = treadle.Run(
        TinyModel(),
        train_data=DataLoader(tiny_data(), batch_size=8, shuffle=True),
        config=treadle.Config(
            max_steps=max_steps,
            grad_accum_steps=2,
            log_every=1,
            output_dir=str(output_dir),
            resume=resume,
            save_at_end=checkpoint is not None,
        ),
        strategy=strategy,
        precision=precision,
        optimizer={"name": "adamw", "lr": 0.02},
        checkpoint=checkpoint,
        loggers=[],
        plugins=[losses],
    )
    with run:
        run.fit()
        state = run.strategy.model_state_dict(run.wrapped_model)
        weights = {k: v.detach().float().cpu() for k, v in state.items()}
    return weights, losses.values, run


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def _finite(losses: list[float]) -> None:
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))


def test_ddp_with_nccl_matches_single(nccl_group: None, tmp_path: Path) -> None:
    weights, losses, run = _fit(DDPStrategy(), tmp_path / "ddp")
    assert run.device.type == "cuda" and dist.get_backend() == "nccl"
    reference, reference_losses, _ = _fit(SingleDevice("cuda:0"), tmp_path / "single")
    _assert_close(weights, reference, atol=1e-5)
    assert losses == pytest.approx(reference_losses, rel=1e-5)


def test_ddp_bf16_mixed(nccl_group: None, tmp_path: Path) -> None:
    weights, losses, run = _fit(DDPStrategy(), tmp_path / "ddp", precision="bf16-mixed")
    _finite(losses)
    assert all(p.dtype == torch.float32 for p in run.model.parameters())  # master weights
    reference, _, _ = _fit(SingleDevice("cuda:0"), tmp_path / "single", precision="bf16-mixed")
    _assert_close(weights, reference, atol=1e-3)
    full, _, _ = _fit(SingleDevice("cuda:0"), tmp_path / "fp32")
    _assert_close(weights, full, atol=5e-2)  # bf16 autocast stays near float32 training


def test_fsdp_bf16_parameters_float32_reductions(nccl_group: None, tmp_path: Path) -> None:
    strategy = FSDPStrategy(param_dtype="bfloat16", reduce_dtype="float32")
    weights, losses, run = _fit(strategy, tmp_path / "fsdp")
    _finite(losses)
    sharded = dict(run.model.named_parameters())["embed.weight"]
    assert type(sharded).__name__ == "DTensor" and sharded.dtype == torch.float32
    assert sharded.device.type == "cuda"
    reference, _, _ = _fit(SingleDevice("cuda:0"), tmp_path / "single")
    _assert_close(weights, reference, atol=5e-2)  # bf16 forward and backward


def test_fsdp_dcp_resume_on_the_gpu(nccl_group: None, tmp_path: Path) -> None:
    whole, _, _ = _fit(FSDPStrategy(), tmp_path / "whole")
    _fit(FSDPStrategy(), tmp_path / "parts", checkpoint=DCPFormat(), max_steps=4)
    resumed, _, run = _fit(
        FSDPStrategy(), tmp_path / "parts", checkpoint=DCPFormat(), resume="auto", model_seed=1
    )
    assert run.last_checkpoint is not None
    _assert_close(resumed, whole, atol=1e-6)


def test_ddp_makes_its_own_nccl_group(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from treadle.testing import free_port

    for name, value in [("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))]:  # fmt: skip
        monkeypatch.setenv(name, value)
    _, losses, _ = _fit(DDPStrategy(), tmp_path / "own", max_steps=2)
    assert losses
    assert not dist.is_initialized()  # the strategy made the group, so it destroyed it
