"""``ema``: a moving average of the weights equal to a hand computation; evaluation with it;
bit-exact resume; export."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import toy
from torch import nn

import treadle
from treadle.errors import ConfigError, TreadleError
from treadle.plugins.techniques.ema import EMA


class Trajectory:
    """The trainable weights after every optimizer step."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    @treadle.hookimpl
    def on_step_end(self, run: treadle.Run) -> None:
        self.weights.append({n: p.detach().clone() for n, p in run.model.named_parameters()})


def make_run(
    model: nn.Module, *plugins: Any, out: Path | None = None, **config: Any
) -> treadle.Run:
    options: dict[str, Any] = {"max_steps": 8, "seed": 0, **config}
    if out is not None:
        options["output_dir"] = str(out)
    return treadle.Run(
        model,
        toy.train_data(n=64),
        eval_data=toy.train_data(n=16, seed=7),
        config=treadle.Config(**options),
        optimizer={"name": "adamw", "lr": 0.05},
        loggers=[],
        checkpoint="safetensors" if out is not None else None,
        plugins=list(plugins),
    )


def reference_ema(
    initial: dict[str, torch.Tensor],
    trajectory: list[dict[str, torch.Tensor]],
    decay: float,
    every: int,
    warmup_steps: int,
) -> dict[str, torch.Tensor]:
    """The average written out: after step k (from 1), if k % every == 0, copy during the
    warm-up, else ema = decay * ema + (1 - decay) * weights."""
    ema = {n: t.clone() for n, t in initial.items()}
    for step, weights in enumerate(trajectory, start=1):
        if step % every:
            continue
        for name in ema:
            if step <= warmup_steps:
                ema[name] = weights[name].clone()
            else:
                ema[name] = decay * ema[name] + (1 - decay) * weights[name]
    return ema


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("every", "warmup_steps"), [(1, 0), (3, 2), (2, 5)])
def test_equals_the_reference_computation(every: int, warmup_steps: int) -> None:
    torch.manual_seed(0)
    model = toy.model()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trajectory = Trajectory()
    ema = EMA(decay=0.7, every=every, warmup_steps=warmup_steps)
    make_run(model, ema, trajectory).fit()
    expected = reference_ema(initial, trajectory.weights, 0.7, every, warmup_steps)
    averaged = ema.averaged()
    assert sorted(averaged) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(averaged[name], tensor, rtol=1e-6, atol=1e-7)
        assert not torch.equal(averaged[name], trajectory.weights[-1][name])  # it lags
    assert ema.updates == 8 // every
    assert averaged[name].device == model.net[0].weight.device


def eval_loss(model: nn.Module) -> float:
    with torch.no_grad():
        losses = [model(**batch)["loss"] for batch in toy.train_data(n=16, seed=7)]
    return float(torch.stack(losses).mean())


@pytest.mark.timeout(60)
def test_evaluation_uses_the_average_and_training_continues_on_the_live_weights() -> None:
    logged: list[float] = []

    class EvalLog:
        @treadle.hookimpl
        def on_eval_end(self, metrics: dict[str, float]) -> None:
            logged.append(metrics["eval/loss"])

    results = {}
    for use_for_eval in (True, False):
        torch.manual_seed(0)
        model = toy.model()
        ema = EMA(decay=0.8, use_for_eval=use_for_eval)
        logged.clear()
        run = make_run(model, ema, EvalLog(), eval_every=4)
        run.fit()
        reference = copy.deepcopy(model)
        ema.copy_to(reference)
        results[use_for_eval] = (list(logged), eval_loss(model), eval_loss(reference), model)
    with_ema, without = results[True], results[False]
    # the final evaluation (step 8) saw the averaged weights when asked, else the live ones
    assert with_ema[0][-1] == pytest.approx(with_ema[2], rel=1e-6)
    assert without[0][-1] == pytest.approx(without[1], rel=1e-6)
    assert with_ema[0][-1] != pytest.approx(with_ema[1], rel=1e-3)
    # swapping back is exact: the weights after training are the same either way
    for a, b in zip(with_ema[3].parameters(), without[3].parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.timeout(120)
def test_a_resumed_run_ends_with_the_same_average_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    whole = EMA(decay=0.9, every=2, warmup_steps=1)
    make_run(toy.model(dropout=0.1), whole).fit()

    torch.manual_seed(0)
    first = EMA(decay=0.9, every=2, warmup_steps=1)
    make_run(toy.model(dropout=0.1), first, out=tmp_path, max_steps=5, save_every=5).fit()

    torch.manual_seed(123)  # other initial weights: everything must come from the checkpoint
    resumed = EMA(decay=0.9, every=2, warmup_steps=1)
    run = make_run(toy.model(dropout=0.1), resumed, out=tmp_path, resume="auto")
    run.fit()
    assert run.state.step == 8
    assert resumed.updates == whole.updates
    for name, tensor in whole.averaged().items():
        assert torch.equal(resumed.averaged()[name], tensor), name


@pytest.mark.timeout(60)
def test_resuming_a_checkpoint_without_an_average_warns(tmp_path: Path) -> None:
    torch.manual_seed(0)
    make_run(toy.model(), out=tmp_path, max_steps=2, save_every=2).fit()
    ema = EMA()
    run = make_run(toy.model(), ema, out=tmp_path, resume="auto", max_steps=3)
    with pytest.warns(treadle.TreadleWarning, match="no moving average"):
        run.fit()


@pytest.mark.timeout(60)
def test_export_state_dict_and_apply_at_end() -> None:
    torch.manual_seed(0)
    model = toy.model()
    ema = EMA(decay=0.5)
    with pytest.raises(TreadleError, match="first fit"):
        ema.ema_state_dict()
    make_run(model, ema).fit()
    state = ema.ema_state_dict()
    assert list(state) == list(model.state_dict())
    assert not torch.equal(state["net.0.weight"], model.net[0].weight)
    fresh = toy.model()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.net[0].weight, ema.averaged()["net.0.weight"])

    torch.manual_seed(0)
    model = toy.model()
    ema = EMA(decay=0.5, apply_at_end=True)
    make_run(model, ema).fit()
    assert all(torch.equal(model.get_parameter(n), t) for n, t in ema.averaged().items())
    with pytest.raises(TreadleError, match="no parameter"):
        ema.copy_to(nn.Linear(2, 2))


@pytest.mark.timeout(60)
def test_found_by_name_with_options() -> None:
    torch.manual_seed(0)
    run = make_run(toy.model(), {"name": "ema", "decay": 0.99, "every": 2})
    run.fit()
    plugin = next(p for p in run.plugin_manager.get_plugins() if isinstance(p, EMA))
    assert plugin.decay == 0.99 and plugin.updates == 4


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"decay": 1.0}, "decay = 1.0"),
        ({"decay": 0}, "decay = 0"),
        ({"decay": float("nan")}, "decay = nan"),
        ({"every": 0}, "every = 0"),
        ({"every": 1.5}, "every = 1.5"),
        ({"warmup_steps": -1}, "warmup_steps = -1"),
        ({"use_for_eval": "yes"}, "use_for_eval = 'yes'"),
        ({"apply_at_end": 1}, "apply_at_end = 1"),
    ],
)
def test_bad_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EMA(**options)
