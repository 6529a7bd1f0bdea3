"""Precision on a CUDA device: real autocast and GradScaler, bf16, TF32. Skipped without CUDA.

Self-contained: ``pytest tests/test_precision_cuda.py`` on a GPU machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import treadle
from treadle.plugins.callbacks.clipping import GradClip
from treadle.plugins.callbacks.numeric_guard import NumericGuard
from treadle.plugins.losses import CausalLMLoss
from treadle.plugins.precision import FP32, BF16Mixed, BF16True, FP16Mixed
from treadle.plugins.strategies.single import SingleDevice

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VOCAB = 32
# with its index: SingleDevice("cuda") would pass an index-less device to torch.cuda.set_device
CUDA = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cuda"


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))


def make_batches(n: int = 8, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n * size, 16, generator=gen)
    y = torch.sin(x @ torch.randn(16, 1, generator=gen))
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def mse(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
    return F.mse_loss(outputs.float(), batch[1].float())


class Recorder:
    def __init__(self, inject_at_step: int | None = None) -> None:
        self.inject_at_step = inject_at_step
        self.dtypes: list[torch.dtype] = []
        self.scales: list[float] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.logs: list[dict[str, float]] = []

    @treadle.hookimpl
    def on_fit_begin(self, run: treadle.Run) -> None:
        self.weights.append({k: v.detach().clone() for k, v in run.model.state_dict().items()})

    @treadle.hookimpl
    def on_after_backward(self, run: treadle.Run) -> None:
        if run.state.step == self.inject_at_step:
            grad = next(run.model.parameters()).grad
            assert grad is not None
            grad[0, 0] = float("inf")

    @treadle.hookimpl
    def on_step_end(self, run: treadle.Run) -> None:
        self.weights.append({k: v.detach().clone() for k, v in run.model.state_dict().items()})
        if isinstance(run.precision, FP16Mixed):
            self.scales.append(run.precision.scale)

    @treadle.hookimpl
    def on_log(self, metrics: Mapping[str, float]) -> None:
        self.logs.append(dict(metrics))


def fit(
    precision: Any,
    *,
    steps: int = 8,
    plugins: list[Any] | None = None,
    model: nn.Module | None = None,
    lr: float = 1e-2,
) -> treadle.Run:
    run = treadle.Run(
        model=model or make_model(),
        train_data=make_batches(),
        strategy=SingleDevice(CUDA),
        precision=precision,
        optimizer={"name": "adamw", "lr": lr},
        loggers=[],
        checkpoint=None,
        plugins=plugins or [],
        loss_fn=mse,
        config=treadle.Config(max_steps=steps, log_every=1),
    )
    run.fit()
    return run


def training_loss(run: treadle.Run) -> float:
    model = run.model.float()
    x = torch.cat([b[0] for b in make_batches()]).cuda()
    y = torch.cat([b[1] for b in make_batches()]).cuda()
    with torch.no_grad():
        return float(F.mse_loss(model(x), y))


def test_fp16_mixed_on_cuda_skips_an_inf_step_and_halves_the_scale() -> None:
    recorder = Recorder(inject_at_step=2)
    precision = FP16Mixed(init_scale=1024.0, growth_interval=2)
    run = fit(precision, steps=6, plugins=[recorder])
    assert run.device.type == "cuda"
    assert precision.scaler is not None and precision.scaler.is_enabled()
    assert run.state.skipped_steps == 1
    assert recorder.scales == [1024.0, 2048.0, 1024.0, 1024.0, 2048.0, 2048.0]
    w = recorder.weights
    assert all(torch.equal(w[3][k], w[2][k]) for k in w[2])
    assert not all(torch.equal(w[4][k], w[3][k]) for k in w[3])
    assert [m for m in recorder.logs if "skipped_steps" in m] == [
        {"step": 3, "epoch": 0, "loss_scale": 1024.0, "skipped_steps": 1}
    ]


def test_fp16_mixed_autocasts_matmuls_on_cuda() -> None:
    seen: list[torch.dtype] = []
    model = make_model()
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    fit(FP16Mixed(), steps=2, model=model)
    assert seen == [torch.float16, torch.float16]
    assert model[0].weight.dtype == torch.float32


def test_mixed_and_bf16_train_close_to_fp32_on_cuda() -> None:
    fp32 = training_loss(fit(FP32(tf32=False), steps=40, lr=3e-2))
    for precision in (FP16Mixed(), BF16Mixed(), BF16True()):
        if isinstance(precision, BF16Mixed | BF16True) and not torch.cuda.is_bf16_supported():
            continue
        loss = training_loss(fit(precision, steps=40, lr=3e-2))
        assert abs(loss - fp32) < 0.02, (precision.name, loss, fp32)


def test_bf16_mixed_autocasts_on_cuda() -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    seen: list[torch.dtype] = []
    model = make_model()
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    fit(BF16Mixed(), steps=2, model=model)
    assert seen == [torch.bfloat16, torch.bfloat16]


def test_tf32_flag_is_applied_on_cuda() -> None:
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    try:
        FP32(tf32=True).setup(torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cudnn.allow_tf32 is True
        FP32(tf32=False).setup(torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 is False
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_clipping_and_guard_under_fp16_mixed_on_cuda() -> None:
    recorder = Recorder(inject_at_step=1)
    guard = NumericGuard("raise")  # gradients are the scaler's business under fp16-mixed
    run = fit(
        FP16Mixed(init_scale=256.0), steps=4, plugins=[GradClip(max_norm=0.5), guard, recorder]
    )
    assert run.state.skipped_steps == 1
    norms = [m["grad_norm"] for m in recorder.logs if "grad_norm" in m]
    assert len(norms) == 4 and sum(1 for n in norms if n == n and n < float("inf")) == 3


def test_token_accumulation_matches_on_cuda() -> None:
    """Batch 8 vs 2 x 4 with token normalisation, float32 on the GPU (loose tolerance)."""

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 16)
            self.head = nn.Linear(16, VOCAB)

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.embed(input_ids)))

    gen = torch.Generator().manual_seed(2)
    seqs = [
        torch.randint(1, VOCAB, (3 + int(n),), generator=gen)
        for n in torch.randint(0, 12, (16,), generator=gen)
    ]

    def batches(size: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for start in range(0, len(seqs), size):
            group = seqs[start : start + size]
            width = max(len(s) for s in group)
            ids = torch.zeros(size, width, dtype=torch.long)
            labels = torch.full((size, width), -100, dtype=torch.long)
            for row, seq in enumerate(group):
                ids[row, : len(seq)] = seq
                labels[row, : len(seq)] = seq
            out.append({"input_ids": ids, "labels": labels})
        return out

    results = []
    for size, accum in ((8, 1), (2, 4)):
        torch.manual_seed(0)
        model = LM()
        treadle.Run(
            model=model,
            train_data=batches(size),
            strategy=SingleDevice(CUDA),
            precision=FP32(tf32=False),
            optimizer={"name": "sgd", "lr": 0.5},
            loggers=[],
            checkpoint=None,
            loss_fn=CausalLMLoss(),
            config=treadle.Config(
                max_epochs=1, grad_accum_steps=accum, loss_normalization="tokens", log_every=0
            ),
        ).fit()
        results.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)
