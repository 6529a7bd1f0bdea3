"""``grad-clip``: the logged norm is ``clip_grad_norm_``'s on unscaled gradients; the bound holds."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import treadle
from treadle.plugins.callbacks.clipping import GradClip
from treadle.plugins.precision import FP32, FP16Mixed
from treadle.plugins.strategies.single import SingleDevice


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def make_batches(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n * 8, 4, generator=gen)
    y = 3 * (x @ torch.randn(4, 1, generator=gen))
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]


def mse(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
    return F.mse_loss(outputs.float(), batch[1])


class GradProbe:
    """Copies the gradients before clipping (tryfirst); ``AfterClip`` copies them after."""

    def __init__(self) -> None:
        self.before: list[list[torch.Tensor]] = []
        self.after: list[list[torch.Tensor]] = []
        self.logs: list[dict[str, float]] = []

    @staticmethod
    def _grads(run: treadle.Run) -> list[torch.Tensor]:
        return [p.grad.detach().clone() for p in run.model.parameters() if p.grad is not None]

    @treadle.hookimpl(tryfirst=True)
    def on_before_optimizer_step(self, run: treadle.Run) -> None:
        self.before.append(self._grads(run))

    @treadle.hookimpl
    def on_log(self, metrics: Mapping[str, float]) -> None:
        self.logs.append(dict(metrics))


class AfterClip:
    def __init__(self, probe: GradProbe) -> None:
        self.probe = probe

    @treadle.hookimpl(trylast=True)
    def on_before_optimizer_step(self, run: treadle.Run) -> None:
        self.probe.after.append(GradProbe._grads(run))


def fit(
    clip: Any, precision: Any = None, strategy: Any = None, steps: int = 4, accum: int = 1
) -> GradProbe:
    probe = GradProbe()
    run = treadle.Run(
        model=make_model(),
        train_data=make_batches(),
        strategy=strategy or SingleDevice("cpu"),
        precision=precision or FP32(),
        optimizer={"name": "sgd", "lr": 0.05},
        loggers=[],
        checkpoint=None,
        plugins=[clip, probe, AfterClip(probe)],
        loss_fn=mse,
        config=treadle.Config(max_steps=steps, grad_accum_steps=accum, log_every=1),
    )
    run.fit()
    return probe


def as_parameters(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Stand-in parameters holding copies of ``grads``, for ``clip_grad_norm_``."""
    params = []
    for grad in grads:
        param = torch.zeros_like(grad, requires_grad=True)
        param.grad = grad.clone()
        params.append(param)
    return params


def norm(grads: Sequence[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


@pytest.mark.parametrize("precision", [FP32, FP16Mixed])
def test_logged_norm_is_clip_grad_norms_and_the_bound_holds(precision: type) -> None:
    bound = 0.5
    # a moderate loss scale: no overflow, so every step is a clean one to compare
    options = {"init_scale": 256.0} if precision is FP16Mixed else {}
    probe = fit(GradClip(max_norm=bound), precision=precision(**options), accum=2)
    logged = [m["grad_norm"] for m in probe.logs if "grad_norm" in m]
    assert len(logged) == len(probe.before) == len(probe.after) == 4
    for before, after, value in zip(probe.before, probe.after, logged):
        expected = float(nn.utils.clip_grad_norm_(as_parameters(before), bound))
        assert value == pytest.approx(expected, rel=1e-6)
        assert expected > bound  # clipping was active, so the bound is a real check
        assert norm(after) <= bound * (1 + 1e-5)
        # clipping rescales every gradient by the same factor
        for b, a in zip(before, after):
            torch.testing.assert_close(a, b * (bound / (expected + 1e-6)), rtol=1e-5, atol=1e-7)


class ItemCounter(torch.Tensor):
    """A norm that counts how often it is read to the host."""

    reads = 0

    def item(self) -> Any:
        ItemCounter.reads += 1
        return super().item()


class ReadCountingStrategy(SingleDevice):
    def __init__(self) -> None:
        super().__init__("cpu")
        self.norms: list[float] = []

    def clip_grad_norm(
        self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        norm = super().clip_grad_norm(parameters, max_norm, norm_type)
        self.norms.append(float(norm))  # the test's own copy, not counted
        return norm.as_subclass(ItemCounter)


def test_the_last_steps_norm_goes_into_the_training_record_read_once_per_log() -> None:
    probe = GradProbe()
    strategy = ReadCountingStrategy()
    ItemCounter.reads = 0
    run = treadle.Run(
        model=make_model(),
        train_data=make_batches(),
        strategy=strategy,
        optimizer={"name": "sgd", "lr": 0.05},
        loggers=[],
        checkpoint=None,
        plugins=[GradClip(max_norm=1.0), probe],
        loss_fn=mse,
        config=treadle.Config(max_steps=6, log_every=3),
    )
    run.fit()
    # no record of its own: grad_norm is in the training records (with the loss), and only there
    assert [sorted(m) for m in probe.logs] == [
        ["epoch", "grad_norm", "loss", "lr", "samples_per_s", "step", "step_time_s"]
    ] * 2
    assert [m["step"] for m in probe.logs] == [3, 6]
    # the norm of the interval's last step (steps 3 and 6), not of another step nor a mean
    assert len(strategy.norms) == 6 and len(set(strategy.norms)) == 6
    assert [m["grad_norm"] for m in probe.logs] == [strategy.norms[2], strategy.norms[5]]
    assert ItemCounter.reads == 2  # read at the logs, never per step
    assert run.state.last_metrics["grad_norm"] == strategy.norms[5]


def _logs_with(plugin_log_every: int, max_steps: int, log_every: int) -> list[dict[str, Any]]:
    probe = GradProbe()
    run = treadle.Run(
        model=make_model(),
        train_data=make_batches(),
        strategy=SingleDevice("cpu"),
        loggers=[],
        checkpoint=None,
        plugins=[GradClip(max_norm=1.0, log_every=plugin_log_every), probe],
        loss_fn=mse,
        config=treadle.Config(max_steps=max_steps, log_every=log_every),
    )
    run.fit()
    return probe.logs


def test_log_every_on_the_plugin_picks_training_records() -> None:
    logs = _logs_with(4, max_steps=6, log_every=2)
    assert [m["step"] for m in logs] == [2, 4, 6]
    assert [m["step"] for m in logs if "grad_norm" in m] == [4]
    # log_every=0 on the plugin: never
    assert not any("grad_norm" in m for m in _logs_with(0, max_steps=2, log_every=1))


def test_clip_by_value() -> None:
    value = 0.05
    probe = fit(GradClip(value=value))
    logged = [m["grad_norm"] for m in probe.logs if "grad_norm" in m]
    for before, after, norm_logged in zip(probe.before, probe.after, logged):
        assert max(float(g.abs().max()) for g in before) > value
        assert max(float(g.abs().max()) for g in after) <= value * (1 + 1e-6)  # float32 bound
        for b, a in zip(before, after):
            torch.testing.assert_close(a, b.clamp(-value, value))
        assert norm_logged == pytest.approx(norm(before), rel=1e-6)


class CountingStrategy(SingleDevice):
    def __init__(self) -> None:
        super().__init__("cpu")
        self.calls: list[float] = []

    def clip_grad_norm(
        self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        self.calls.append(max_norm)
        return super().clip_grad_norm(parameters, max_norm, norm_type)


def test_the_norm_is_computed_by_the_strategy() -> None:
    strategy = CountingStrategy()
    fit(GradClip(max_norm=2.0), strategy=strategy, steps=3)
    assert strategy.calls == [2.0, 2.0, 2.0]
    strategy = CountingStrategy()
    fit(GradClip(value=1.0), strategy=strategy, steps=2)
    assert strategy.calls == [math.inf, math.inf]


@pytest.mark.parametrize(
    "options",
    [
        {"max_norm": 1.0, "value": 1.0},
        {"max_norm": 0.0},
        {"max_norm": -1.0},
        {"max_norm": math.nan},
        {"value": math.inf},
        {"norm_type": 0},
        {"log_every": -1},
        {"max_norm": True},
    ],
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(treadle.ConfigError, match="grad-clip"):
        GradClip(**options)


def test_default_is_max_norm_one() -> None:
    clip = GradClip()
    assert (clip.max_norm, clip.value, clip.norm_type) == (1.0, None, 2.0)


def test_found_by_name() -> None:
    probe = GradProbe()
    run = treadle.Run(
        model=make_model(),
        train_data=make_batches(),
        strategy=SingleDevice("cpu"),
        loggers=[],
        checkpoint=None,
        loss_fn=mse,
        plugins=[{"name": "grad-clip", "max_norm": 0.1}, probe],
        config=treadle.Config(max_steps=1, log_every=1),
    )
    run.fit()
    assert any("grad_norm" in m for m in probe.logs)
