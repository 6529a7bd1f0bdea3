"""Precision plugins on CPU: fp16 loss scaling and skipped steps, bf16, true dtypes, checks."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import treadle
from treadle import registry
from treadle.plugins.precision import FP32, FP64, BF16Mixed, BF16True, FP16Mixed, FP16True
from treadle.plugins.strategies.single import SingleDevice

NAMES = {
    "fp32": FP32,
    "fp64": FP64,
    "fp16-mixed": FP16Mixed,
    "bf16-mixed": BF16Mixed,
    "bf16-true": BF16True,
    "fp16-true": FP16True,
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def make_batches(n_batches: int = 8, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n_batches * size, 4, generator=gen)
    y = torch.sin(x @ torch.randn(4, 1, generator=gen))
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def mse(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
    return F.mse_loss(outputs.float(), batch[1].float())


class Recorder:
    """Logs, per-step weights, scale and gradients, and optional inf injection."""

    def __init__(self, inject_at_step: int | None = None) -> None:
        self.inject_at_step = inject_at_step
        self.logs: list[dict[str, float]] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.scales: list[float] = []
        self.grads_after_backward: list[torch.Tensor] = []
        self.grads_before_step: list[torch.Tensor] = []

    @treadle.hookimpl
    def on_fit_begin(self, run: treadle.Run) -> None:
        self.weights.append(_weights(run.model))

    @treadle.hookimpl
    def on_after_backward(self, run: treadle.Run) -> None:
        grad = next(run.model.parameters()).grad
        assert grad is not None
        self.grads_after_backward.append(grad.detach().clone())
        if run.state.step == self.inject_at_step:
            grad[0, 0] = float("inf")  # scaled gradients: before GradScaler.unscale_ sees them

    @treadle.hookimpl
    def on_before_optimizer_step(self, run: treadle.Run) -> None:
        grad = next(run.model.parameters()).grad
        assert grad is not None
        self.grads_before_step.append(grad.detach().clone())

    @treadle.hookimpl
    def on_step_end(self, run: treadle.Run) -> None:
        self.weights.append(_weights(run.model))
        if isinstance(run.precision, FP16Mixed):
            self.scales.append(run.precision.scale)

    @treadle.hookimpl
    def on_log(self, metrics: Mapping[str, float]) -> None:
        self.logs.append(dict(metrics))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(
    precision: Any,
    *,
    steps: int = 8,
    plugins: Sequence[Any] = (),
    output_dir: Path | None = None,
    checkpoint: str | None = None,
    resume: str | None = None,
    lr: float = 1e-2,
    save_every: int | None = None,
) -> treadle.Run:
    run = treadle.Run(
        model=make_model(),
        train_data=make_batches(),
        strategy=SingleDevice("cpu"),
        precision=precision,
        optimizer={"name": "adamw", "lr": lr},
        loggers=[],
        checkpoint=checkpoint,
        plugins=list(plugins),
        loss_fn=mse,
        config=treadle.Config(
            max_steps=steps,
            log_every=1,
            save_every=save_every,
            output_dir=str(output_dir or "runs/unused"),
            resume=resume,
            save_at_end=checkpoint is not None,
        ),
    )
    run.fit()
    return run


# ---------------------------------------------------------------- discovery


@pytest.mark.parametrize("name", sorted(NAMES))
def test_found_by_name(name: str) -> None:
    assert registry.load("precision", name) is NAMES[name]
    assert NAMES[name].name == name


# ---------------------------------------------------------------- fp16-mixed


def test_fp16_mixed_gradients_are_unscaled_before_the_optimizer_step() -> None:
    recorder = Recorder()
    fit(FP16Mixed(), steps=1, plugins=[recorder])
    reference = Recorder()
    fit(FP32(), steps=1, plugins=[reference])
    scaled, unscaled = recorder.grads_after_backward[0], recorder.grads_before_step[0]
    torch.testing.assert_close(scaled, unscaled * 2.0**16, rtol=1e-6, atol=0)
    # the unscaled gradient is the true one, up to float16 rounding in the forward pass
    torch.testing.assert_close(unscaled, reference.grads_before_step[0], rtol=2e-2, atol=1e-4)


def test_fp16_mixed_skips_an_inf_step_halves_the_scale_and_resumes(tmp_path: Path) -> None:
    # growth every 2 clean steps, so the growth tracker matters for the resumed run
    def precision() -> FP16Mixed:
        return FP16Mixed(init_scale=1024.0, growth_interval=2)

    recorder = Recorder(inject_at_step=2)  # the third step (state.step == 2 while computing it)
    run = fit(precision(), steps=6, plugins=[recorder])
    assert run.state.skipped_steps == 1
    # scales after steps 1..6: grow after 2 clean steps, halve on the skip, grow again
    assert recorder.scales == [1024.0, 2048.0, 1024.0, 1024.0, 2048.0, 2048.0]
    # the skipped step left the weights alone; the steps around it moved them
    w = recorder.weights
    assert all(torch.equal(w[3][k], w[2][k]) for k in w[2])
    assert not all(torch.equal(w[4][k], w[3][k]) for k in w[3])
    assert not all(torch.equal(w[2][k], w[1][k]) for k in w[1])
    assert all(torch.isfinite(v).all() for v in w[-1].values())
    # the skip is logged, with the step that was skipped and the new scale
    skip_logs = [m for m in recorder.logs if "skipped_steps" in m]
    assert skip_logs == [{"step": 3, "epoch": 0, "loss_scale": 1024.0, "skipped_steps": 1}]

    # the scaler state goes into the checkpoint and comes back on resume
    first = fit(
        precision(),
        steps=4,
        plugins=[Recorder(inject_at_step=2)],
        output_dir=tmp_path,
        checkpoint="safetensors",
    )
    stored = json.loads((tmp_path / "checkpoints" / "step-000004" / "precision.json").read_text())
    stored = stored.get("value", stored)  # the kernel may wrap the state with metadata
    assert stored["scale"] == 1024.0 and stored["_growth_tracker"] == 1
    assert first.precision.state_dict()["scale"] == 1024.0
    resumed_precision = precision()
    resumed = fit(
        resumed_precision,
        steps=6,
        plugins=[],
        output_dir=tmp_path,
        checkpoint="safetensors",
        resume="auto",
    )
    assert resumed.state.skipped_steps == 1
    # step 5 is the second clean step since the skip only if the tracker (1) was restored
    assert resumed_precision.scale == 2048.0
    for key, value in _weights(resumed.model).items():
        assert torch.equal(value, w[-1][key]), key


def test_fp16_mixed_state_before_setup_round_trips() -> None:
    precision = FP16Mixed()
    precision.load_state_dict(
        {
            "scale": 8.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 3,
        }
    )
    assert precision.scale == 8.0
    precision.setup(torch.device("cpu"))
    assert precision.scale == 8.0
    assert precision.state_dict()["_growth_tracker"] == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backoff_factor": 1.5}, "backoff_factor"),
        ({"growth_factor": 1.0}, "growth_factor"),
        ({"growth_interval": 0}, "growth_interval"),
        ({"init_scale": -1.0}, "init_scale"),
        ({"tf32": "yes"}, "tf32"),
    ],
)
def test_fp16_mixed_rejects_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(treadle.ConfigError, match=message):
        FP16Mixed(**options)


# ---------------------------------------------------------------- bf16 and the true dtypes


def final_loss(precision: Any) -> float:
    run = fit(precision, steps=40, lr=3e-2)
    model = run.model.float()
    x = torch.cat([b[0] for b in make_batches()])
    y = torch.cat([b[1] for b in make_batches()])
    with torch.no_grad():
        return float(F.mse_loss(model(x), y))


def test_bf16_mixed_and_bf16_true_train_close_to_fp32() -> None:
    # Stated bound: after 40 AdamW steps, each bf16 variant's loss on the training set (in
    # float32) is within 0.01 of fp32's, while training took the loss down by far more.
    # (Measured: fp32 0.28164, bf16-mixed 0.28161, bf16-true 0.28116.)
    torch.manual_seed(0)
    x = torch.cat([b[0] for b in make_batches()])
    y = torch.cat([b[1] for b in make_batches()])
    with torch.no_grad():
        initial = float(F.mse_loss(make_model()(x), y))
    fp32 = final_loss(FP32())
    assert initial - fp32 > 0.1
    for precision in (BF16Mixed(), BF16True()):
        assert abs(final_loss(precision) - fp32) < 0.01, precision.name


def test_bf16_mixed_autocasts_the_forward_pass() -> None:
    seen: list[torch.dtype] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.linear(x)
            seen.append(out.dtype)
            return out

    run = treadle.Run(
        model=Probe(),
        train_data=make_batches(2),
        strategy=SingleDevice("cpu"),
        precision=BF16Mixed(),
        loggers=[],
        checkpoint=None,
        loss_fn=mse,
        config=treadle.Config(max_steps=2, log_every=0),
    )
    run.fit()
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert run.model.linear.weight.dtype == torch.float32


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [(BF16True, torch.bfloat16), (FP16True, torch.float16), (FP64, torch.float64)],
)
def test_true_dtypes_convert_module_and_inputs(precision: type, dtype: torch.dtype) -> None:
    inputs: list[torch.dtype] = []
    defaults: list[torch.dtype] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            inputs.append(x.dtype)
            defaults.append(torch.empty(1).dtype)  # a tensor made on the fly, without dtype=
            return self.linear(x)

    run = treadle.Run(
        model=Probe(),
        train_data=make_batches(3),
        strategy=SingleDevice("cpu"),
        precision=precision(),
        loggers=[],
        checkpoint=None,
        loss_fn=mse,
        optimizer={"name": "sgd", "lr": 0.1},
        config=treadle.Config(max_steps=3, log_every=1),
    )
    state = run.fit()
    assert run.model.linear.weight.dtype == dtype
    assert inputs == [dtype] * 3 and defaults == [dtype] * 3
    assert torch.get_default_dtype() == torch.float32  # restored after every forward
    assert torch.isfinite(run.model.linear.weight).all()
    assert state.last_metrics["loss"] == state.last_metrics["loss"]  # not NaN


def test_integer_inputs_stay_integers() -> None:
    from treadle.plugins.precision import _cast_floating

    batch = {"ids": torch.ones(2, dtype=torch.long), "x": [torch.ones(2)], "t": "text"}
    cast = _cast_floating(batch, torch.bfloat16)
    assert cast["ids"].dtype == torch.long
    assert cast["x"][0].dtype == torch.bfloat16
    assert cast["t"] == "text"


# ---------------------------------------------------------------- checks at compose time


class MetaStrategy(SingleDevice):
    """A strategy on a device with no autocast at all (``meta``)."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.device = torch.device("meta")


@pytest.mark.parametrize("precision", [FP16Mixed, BF16Mixed])
def test_autocast_precision_on_a_device_without_autocast_fails_at_compose_time(
    precision: type,
) -> None:
    with pytest.raises(treadle.ConfigError, match=f"{precision.name}.*meta"):
        treadle.Run(
            model=make_model(),
            train_data=make_batches(1),
            strategy=MetaStrategy(),
            precision=precision(),
            loggers=[],
            checkpoint=None,
            loss_fn=mse,
        )


def test_fp64_on_mps_is_refused() -> None:
    with pytest.raises(treadle.ConfigError, match="float64"):
        FP64().check_device(torch.device("mps"))


def test_a_strategy_owning_precision_refuses_a_precision_plugin() -> None:
    class Engine(SingleDevice):
        owns_precision = True

    with pytest.raises(treadle.ConfigError, match="manages numeric precision itself"):
        treadle.Run(
            model=make_model(),
            train_data=make_batches(1),
            strategy=Engine("cpu"),
            precision=FP16Mixed(),
            loggers=[],
            checkpoint=None,
            loss_fn=mse,
        )
    # without a separate precision plugin it composes
    treadle.Run(
        model=make_model(),
        train_data=make_batches(1),
        strategy=Engine("cpu"),
        loggers=[],
        checkpoint=None,
        loss_fn=mse,
    )


def test_tf32_on_cpu_warns_that_it_has_no_effect() -> None:
    before = torch.get_float32_matmul_precision()
    with pytest.warns(treadle.TreadleWarning, match="no effect"):
        FP32(tf32=True).setup(torch.device("cpu"))
    assert torch.get_float32_matmul_precision() == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FP32().setup(torch.device("cpu"))  # tf32=None: silent
