"""``numeric-guard``: raise, skip or stop on an injected NaN loss or inf gradient."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import treadle
from treadle.plugins.callbacks.numeric_guard import NonFiniteError, NumericGuard
from treadle.plugins.precision import FP16Mixed
from treadle.plugins.strategies.single import SingleDevice

ACCUM = 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def make_batches(n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n * 4, 4, generator=gen)
    y = x @ torch.randn(4, 1, generator=gen)
    return [(x[i : i + 4], y[i : i + 4]) for i in range(0, len(x), 4)]


class NaNLoss:
    """``loss_fn`` that returns NaN for one micro-batch (1-based micro-step of the run)."""

    def __init__(self, at_micro_step: int | None) -> None:
        self.at = at_micro_step
        self.calls = 0

    def __call__(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        self.calls += 1
        loss = F.mse_loss(outputs.float(), batch[1])
        return loss * float("nan") if self.calls == self.at else loss


class Recorder:
    def __init__(self, inf_grad_at_step: int | None = None) -> None:
        self.inf_grad_at_step = inf_grad_at_step
        self.weights: list[dict[str, torch.Tensor]] = []
        self.logs: list[dict[str, float]] = []
        self.lrs: list[float] = []

    @treadle.hookimpl
    def on_fit_begin(self, run: treadle.Run) -> None:
        self.weights.append(_weights(run.model))

    @treadle.hookimpl
    def on_after_backward(self, run: treadle.Run) -> None:
        if run.state.step == self.inf_grad_at_step:
            grad = next(run.model.parameters()).grad
            assert grad is not None
            grad[0, 0] = float("inf")

    @treadle.hookimpl
    def on_step_end(self, run: treadle.Run) -> None:
        self.weights.append(_weights(run.model))
        assert run.optimizer is not None
        self.lrs.append(run.optimizer.param_groups[0]["lr"])

    @treadle.hookimpl
    def on_log(self, metrics: Mapping[str, float]) -> None:
        self.logs.append(dict(metrics))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def fit(
    guard: NumericGuard,
    loss_fn: Any,
    *,
    recorder: Recorder | None = None,
    steps: int = 5,
    precision: Any = None,
    output_dir: Path | None = None,
    plugins: Sequence[Any] = (),
) -> treadle.Run:
    run = treadle.Run(
        model=make_model(),
        train_data=make_batches(),
        strategy=SingleDevice("cpu"),
        precision=precision,
        optimizer={"name": "adamw", "lr": 1e-2},
        scheduler={"name": "linear", "warmup_steps": 0},
        loggers=[],
        checkpoint="safetensors" if output_dir is not None else None,
        plugins=[guard, recorder or Recorder(), *plugins],
        loss_fn=loss_fn,
        config=treadle.Config(
            max_steps=steps,
            grad_accum_steps=ACCUM,
            log_every=1,
            output_dir=str(output_dir or "runs/unused"),
            save_at_end=output_dir is not None,
        ),
    )
    run.fit()
    return run


# The NaN goes into the second micro-batch (index 1) of the third step: micro-step 6.
NAN_MICRO_STEP = 2 * ACCUM + 2


def test_raise_names_the_step_and_the_micro_batch() -> None:
    with pytest.raises(NonFiniteError) as caught:
        fit(NumericGuard("raise"), NaNLoss(NAN_MICRO_STEP))
    error = caught.value
    assert (error.step, error.micro_batch, error.micro_step) == (3, 1, NAN_MICRO_STEP)
    message = str(error)
    assert "step 3" in message and "micro-batch 1" in message and "loss" in message


def test_raise_does_nothing_on_finite_training() -> None:
    run = fit(NumericGuard("raise"), NaNLoss(None))
    assert run.state.step == 5 and run.state.skipped_steps == 0


def test_skip_drops_the_step_counts_and_logs_it() -> None:
    recorder = Recorder()
    guard = NumericGuard("skip")
    run = fit(guard, NaNLoss(NAN_MICRO_STEP), recorder=recorder)
    w = recorder.weights  # w[k]: after k steps
    assert run.state.step == 5 and run.state.skipped_steps == 1 and guard.skipped == 1
    assert same(w[3], w[2])  # step 3 was dropped
    assert not same(w[4], w[3]) and not same(w[2], w[1])  # training went on around it
    assert all(torch.isfinite(v).all() for v in w[-1].values())
    # the scheduler did not advance on the dropped step
    assert recorder.lrs[2] == recorder.lrs[1]
    assert recorder.lrs[3] < recorder.lrs[2]
    assert [m for m in recorder.logs if "nonfinite_skipped" in m] == [
        {"step": 3, "epoch": 0, "nonfinite_skipped": 1}
    ]


def test_stop_saves_the_last_finite_weights_and_stops(tmp_path: Path) -> None:
    recorder = Recorder()
    run = fit(
        NumericGuard("stop"),
        NaNLoss(NAN_MICRO_STEP),
        recorder=recorder,
        output_dir=tmp_path,
        steps=10,
    )
    assert run.state.step == 3
    assert run.state.stop_reason is not None and "numeric-guard" in run.state.stop_reason
    assert "step 3" in run.state.stop_reason
    assert run.state.skipped_steps == 1
    saved = tmp_path / "checkpoints" / "step-000003"
    assert run.last_checkpoint == saved and saved.is_dir()
    # the checkpoint holds the weights from before the bad step, and they are finite
    reloaded = treadle.Run(
        model=make_model(),
        train_data=make_batches(),
        strategy=SingleDevice("cpu"),
        loggers=[],
        checkpoint="safetensors",
        loss_fn=NaNLoss(None),
        config=treadle.Config(max_steps=3, output_dir=str(tmp_path), resume=str(saved)),
    )
    with pytest.warns(treadle.TreadleWarning, match="already stopped at step 3 \\(numeric-guard"):
        reloaded.fit()  # the checkpoint records the guard's stop: it only loads
    assert same(_weights(reloaded.model), recorder.weights[2])


def test_skip_catches_a_non_finite_gradient_norm() -> None:
    recorder = Recorder(inf_grad_at_step=1)
    run = fit(NumericGuard("skip"), NaNLoss(None), recorder=recorder)
    assert run.state.skipped_steps == 1
    assert same(recorder.weights[2], recorder.weights[1])
    with pytest.raises(NonFiniteError, match="gradient norm at step 2") as caught:
        fit(NumericGuard("raise"), NaNLoss(None), recorder=Recorder(inf_grad_at_step=1))
    assert caught.value.micro_batch is None
    # with the gradient check turned off, the inf reaches the weights
    recorder = Recorder(inf_grad_at_step=1)
    fit(NumericGuard("skip", check_grads=False), NaNLoss(None), recorder=recorder)
    assert not all(torch.isfinite(v).all() for v in recorder.weights[-1].values())


def test_skip_under_fp16_mixed_keeps_the_scaler_consistent() -> None:
    recorder = Recorder()
    guard = NumericGuard("skip")
    precision = FP16Mixed(init_scale=256.0)
    run = fit(guard, NaNLoss(NAN_MICRO_STEP), recorder=recorder, precision=precision)
    assert run.state.step == 5 and guard.skipped == 1 and run.state.skipped_steps == 1
    assert same(recorder.weights[3], recorder.weights[2])
    assert not same(recorder.weights[5], recorder.weights[4])
    assert precision.scale == 128.0  # the NaN gradients still lowered the scale once
    # gradients are not checked under a precision that skips such steps itself
    assert not guard._checks_grads(run)


def test_guard_count_survives_a_checkpoint(tmp_path: Path) -> None:
    fit(NumericGuard("skip"), NaNLoss(NAN_MICRO_STEP), output_dir=tmp_path, steps=4)
    guard = NumericGuard("skip")
    run = treadle.Run(
        model=make_model(),
        train_data=make_batches(),
        strategy=SingleDevice("cpu"),
        loggers=[],
        checkpoint="safetensors",
        loss_fn=NaNLoss(None),
        plugins=[guard],
        config=treadle.Config(
            max_steps=5, output_dir=str(tmp_path), resume="auto", grad_accum_steps=ACCUM
        ),
    )
    run.fit()
    assert guard.skipped == 1 and run.state.skipped_steps == 1


@pytest.mark.parametrize(
    ("options", "field"),
    [({"policy": "ignore"}, "policy"), ({"check_grads": "yes"}, "check_grads")],
)
def test_bad_options_are_refused(options: dict[str, Any], field: str) -> None:
    with pytest.raises(treadle.ConfigError, match=field):
        NumericGuard(**options)


def test_found_by_name() -> None:
    with pytest.raises(NonFiniteError):
        treadle.Run(
            model=make_model(),
            train_data=make_batches(),
            strategy=SingleDevice("cpu"),
            loggers=[],
            checkpoint=None,
            loss_fn=NaNLoss(1),
            plugins=[{"name": "numeric-guard", "policy": "raise"}],
            config=treadle.Config(max_steps=2),
        ).fit()
