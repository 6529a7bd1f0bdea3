"""The learning-rate schedules: trajectories against hand-computed values, errors, state."""

from __future__ import annotations

import json
import math
from typing import Any

import pluggy
import pytest
import torch

from treadle import hookspecs
from treadle.errors import ConfigError, TreadleWarning
from treadle.plugins import schedulers


def _optimizer(lr: float = 1.0, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def _make(name: str, lr: float = 1.0, **kwargs: Any) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = _optimizer(lr)
    return optimizer, getattr(schedulers, name)(optimizer, **kwargs)


def _run(optimizer: torch.optim.Optimizer, scheduler: Any, steps: int) -> list[float]:
    """Learning rate at steps 0..steps, stepped as the kernel does."""
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
        assert optimizer.param_groups[0]["lr"] == lrs[-1]
    return lrs


def _trajectory(name: str, steps: int, lr: float = 1.0, **kwargs: Any) -> list[float]:
    return _run(*_make(name, lr, **kwargs), steps)


def _close(actual: list[float], expected: dict[int, float]) -> None:
    for step, value in expected.items():
        assert actual[step] == pytest.approx(value, abs=1e-12), f"step {step}"


def test_constant() -> None:
    assert _trajectory("constant", 5, lr=0.3, total_steps=5) == [0.3] * 6


def test_constant_with_warmup() -> None:
    lrs = _trajectory("constant_with_warmup", 8, total_steps=8, warmup_steps=4)
    _close(lrs, {0: 0.0, 1: 0.25, 2: 0.5, 4: 1.0, 8: 1.0})


def test_linear() -> None:
    lrs = _trajectory("linear", 12, lr=2.0, total_steps=10, warmup_steps=2)
    # Base lr at the end of warmup, 0 at total_steps, halfway between them: half.
    _close(lrs, {0: 0.0, 1: 1.0, 2: 2.0, 6: 1.0, 9: 0.25, 10: 0.0, 12: 0.0})


def test_cosine() -> None:
    _close(_trajectory("cosine", 10, total_steps=10), {0: 1.0, 5: 0.5, 10: 0.0})
    lrs = _trajectory("cosine", 10, total_steps=10, warmup_steps=2)
    _close(lrs, {1: 0.5, 2: 1.0, 6: 0.5, 4: 0.5 * (1 + math.cos(math.pi / 4)), 10: 0.0})
    # A full period comes back up to the base lr.
    _close(_trajectory("cosine", 10, total_steps=10, num_cycles=1.0), {5: 0.0, 10: 1.0})


def test_cosine_with_min_lr() -> None:
    lrs = _trajectory("cosine_with_min_lr", 10, total_steps=10, min_lr_rate=0.1)
    _close(lrs, {0: 1.0, 5: 0.55, 10: 0.1})
    lrs = _trajectory("cosine_with_min_lr", 10, lr=0.5, total_steps=10, min_lr=0.05)
    _close(lrs, {0: 0.5, 5: 0.275, 10: 0.05})


def test_polynomial() -> None:
    lrs = _trajectory("polynomial", 12, total_steps=10, lr_end=0.1, power=2.0)
    _close(lrs, {0: 1.0, 5: 0.9 * 0.25 + 0.1, 10: 0.1, 12: 0.1})
    lrs = _trajectory("polynomial", 10, total_steps=10, warmup_steps=2, lr_end=0.0 + 1e-7)
    _close(lrs, {1: 0.5, 2: 1.0, 6: 0.5 * (1 - 1e-7) + 1e-7})


def test_polynomial_per_group_base_lr() -> None:
    optimizer = torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5},
        ]
    )
    scheduler = schedulers.polynomial(optimizer, total_steps=10, lr_end=0.1)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.1, 0.1])


def test_inverse_sqrt() -> None:
    lrs = _trajectory("inverse_sqrt", 16, total_steps=16, warmup_steps=4)
    _close(lrs, {0: 0.0, 2: 0.5, 4: 1.0, 16: 0.5})
    lrs = _trajectory("inverse_sqrt", 3, total_steps=3, timescale=1)
    _close(lrs, {0: 1.0, 3: 0.5})


def test_warmup_stable_decay() -> None:
    kwargs = {"total_steps": 10, "warmup_steps": 2, "num_decay_steps": 4}
    lrs = _trajectory("warmup_stable_decay", 11, decay_type="linear", **kwargs)
    _close(lrs, {0: 0.0, 1: 0.5, 2: 1.0, 5: 1.0, 6: 1.0, 8: 0.5, 9: 0.25, 10: 0.0, 11: 0.0})
    lrs = _trajectory("warmup_stable_decay", 10, decay_type="linear", min_lr_ratio=0.2, **kwargs)
    _close(lrs, {1: 0.6, 8: 0.6, 10: 0.2})
    _close(_trajectory("warmup_stable_decay", 10, **kwargs), {8: 0.5, 10: 0.0})  # cosine
    lrs = _trajectory("warmup_stable_decay", 10, decay_type="1-sqrt", **kwargs)
    _close(lrs, {7: 0.5})
    lrs = _trajectory("warmup_stable_decay", 10, total_steps=10, decay_ratio=0.35)
    _close(lrs, {0: 1.0, 6: 1.0, 8: 0.5})  # ceil(3.5) = 4 decay steps


def test_warmup_ratio_is_ceiled() -> None:
    lrs = _trajectory("linear", 10, total_steps=10, warmup_ratio=0.25)  # 3 warmup steps
    _close(lrs, {1: 1 / 3, 3: 1.0, 10: 0.0})


@pytest.mark.parametrize(
    ("name", "kwargs", "fragments"),
    [
        ("linear", {"warmup_steps": -1}, ["'linear'", "warmup_steps=-1", ">= 0"]),
        ("cosine", {"warmup_steps": 11}, ["'cosine'", "warmup_steps=11", "total_steps (10)"]),
        ("linear", {"warmup_ratio": 1.5}, ["'linear'", "warmup_ratio=1.5", "[0, 1]"]),
        ("linear", {"warmup_steps": 2, "warmup_ratio": 0.1}, ["both given"]),
        ("cosine", {"num_cycle": 1}, ["'cosine'", "'num_cycle'", "num_cycles"]),
        ("constant", {"warmup_steps": 2}, ["constant-with-warmup"]),
        ("cosine_with_min_lr", {}, ["'cosine-with-min-lr'", "min_lr_rate"]),
        ("cosine_with_min_lr", {"min_lr_rate": 2.0}, ["min_lr_rate=2.0"]),
        ("polynomial", {"lr_end": 2.0}, ["'polynomial'", "lr_end=2.0"]),
        ("warmup_stable_decay", {}, ["num_decay_steps", "decay_ratio"]),
        (
            "warmup_stable_decay",
            {"num_decay_steps": 3, "decay_type": "exp"},
            ["decay_type='exp'", "1-sqrt"],
        ),
        (
            "warmup_stable_decay",
            {"num_decay_steps": 8, "warmup_steps": 5},
            ["warmup (5) + decay (8)", "total_steps (10)"],
        ),
        ("reduce_on_plateau", {"mode": "up"}, ["'reduce-on-plateau'", "mode='up'", "'max'"]),
        ("reduce_on_plateau", {"pateince": 3}, ["'pateince'", "patience"]),
        ("reduce_on_plateau", {"warmup_steps": 3}, ["no warmup"]),
    ],
)
def test_errors(name: str, kwargs: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        getattr(schedulers, name)(_optimizer(), total_steps=10, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_total_steps_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="total_steps=0"):
        schedulers.linear(_optimizer(), total_steps=0)


def test_warmup_may_exceed_total_for_non_decaying_schedules() -> None:
    schedulers.constant_with_warmup(_optimizer(), total_steps=5, warmup_steps=10)
    schedulers.inverse_sqrt(_optimizer(), total_steps=5, warmup_steps=10)


# ----------------------------------------------------------------------------- plateau


class FakeRun:
    pass


def _eval(scheduler: Any, loss: float, name: str = "eval") -> None:
    scheduler.on_eval_end(FakeRun(), name, {f"{name}/loss": loss})


def test_reduce_on_plateau_after_patience() -> None:
    optimizer, scheduler = _make("reduce_on_plateau", total_steps=100, patience=2, factor=0.5)
    for _ in range(50):  # the kernel steps it after every optimizer step: nothing happens
        scheduler.step()
    assert scheduler.get_last_lr() == [1.0]
    _eval(scheduler, 1.0)  # best so far
    _eval(scheduler, 1.0)
    _eval(scheduler, 1.0)  # `patience` evaluations without improvement are tolerated
    assert scheduler.get_last_lr() == [1.0]
    _eval(scheduler, 1.0)
    assert scheduler.get_last_lr() == [0.5]
    assert optimizer.param_groups[0]["lr"] == 0.5
    _eval(scheduler, 0.1)  # improvement
    _eval(scheduler, 0.1)
    _eval(scheduler, 0.1)
    assert scheduler.get_last_lr() == [0.5]


def test_reduce_on_plateau_mode_max_and_min_lr() -> None:
    _, scheduler = _make(
        "reduce_on_plateau", total_steps=10, monitor="val/acc", mode="max", patience=0,
        min_lr=0.3,
    )  # fmt: skip
    scheduler.on_eval_end(FakeRun(), "val", {"val/acc": 0.5})
    scheduler.on_eval_end(FakeRun(), "val", {"val/acc": 0.6})
    assert scheduler.get_last_lr() == [1.0]
    scheduler.on_eval_end(FakeRun(), "val", {"val/acc": 0.4})
    assert scheduler.get_last_lr() == [pytest.approx(0.3)]  # 0.1 is floored at min_lr


def test_reduce_on_plateau_ignores_other_eval_sets_and_warns_on_missing_key() -> None:
    _, scheduler = _make("reduce_on_plateau", total_steps=10, patience=0)
    _eval(scheduler, 1.0, name="other")
    _eval(scheduler, 2.0, name="other")
    assert scheduler.get_last_lr() == [1.0]
    with pytest.warns(TreadleWarning, match="eval/loss"):
        scheduler.on_eval_end(FakeRun(), "eval", {"eval/acc": 0.5})


def test_reduce_on_plateau_is_called_through_pluggy() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    _, scheduler = _make("reduce_on_plateau", total_steps=10, patience=0)
    pm.register(scheduler)
    pm.hook.on_eval_end(run=FakeRun(), name="eval", metrics={"eval/loss": 1.0})
    pm.hook.on_eval_end(run=FakeRun(), name="eval", metrics={"eval/loss": 2.0})
    assert scheduler.get_last_lr() == [pytest.approx(0.1)]


# ----------------------------------------------------------------------------- state


STEP_SCHEDULES = [
    ("constant", {}),
    ("constant_with_warmup", {"warmup_steps": 3}),
    ("linear", {"warmup_steps": 3}),
    ("cosine", {"warmup_ratio": 0.2}),
    ("cosine_with_min_lr", {"warmup_steps": 2, "min_lr_rate": 0.1}),
    ("polynomial", {"warmup_steps": 2, "power": 2.0, "lr_end": 0.01}),
    ("inverse_sqrt", {"warmup_steps": 3}),
    ("warmup_stable_decay", {"warmup_steps": 2, "decay_ratio": 0.4, "decay_type": "1-sqrt"}),
]


def _json_round_trip(state: dict[str, Any]) -> dict[str, Any]:
    # allow_nan=False: strict JSON, no Infinity/NaN literals.
    loaded: dict[str, Any] = json.loads(json.dumps(state, allow_nan=False))
    return loaded


@pytest.mark.parametrize(("name", "kwargs"), STEP_SCHEDULES)
def test_state_dict_round_trip(name: str, kwargs: dict[str, Any]) -> None:
    optimizer, scheduler = _make(name, lr=0.5, total_steps=12, **kwargs)
    _run(optimizer, scheduler, 4)
    state = _json_round_trip(scheduler.state_dict())
    expected = _run(optimizer, scheduler, 10)[1:]

    fresh_optimizer, fresh = _make(name, lr=0.5, total_steps=12, **kwargs)
    fresh.load_state_dict(state)
    assert _run(fresh_optimizer, fresh, 10)[1:] == expected


def test_reduce_on_plateau_state_round_trip() -> None:
    kwargs = {"total_steps": 10, "patience": 1, "factor": 0.5}
    _, scheduler = _make("reduce_on_plateau", **kwargs)
    initial = scheduler.state_dict()
    assert "inf" in json.dumps(initial, allow_nan=False)  # best starts at +inf
    _eval(scheduler, 1.0)
    _eval(scheduler, 2.0)  # one bad evaluation
    state = _json_round_trip(scheduler.state_dict())
    assert state["plateau"]["num_bad_epochs"] == 1
    assert state["plateau"]["best"] == 1.0

    _, fresh = _make("reduce_on_plateau", **kwargs)
    fresh.load_state_dict(state)
    for loss in (3.0, 3.0, 3.0):
        _eval(scheduler, loss)
        _eval(fresh, loss)
    assert fresh.get_last_lr() == scheduler.get_last_lr() == [0.25]

    # A fresh state (best = inf) survives JSON too.
    _, other = _make("reduce_on_plateau", **kwargs)
    other.load_state_dict(_json_round_trip(initial))
    assert other.plateau.best == math.inf
