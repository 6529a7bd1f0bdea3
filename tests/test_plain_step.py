"""The plain step: the loop's inline path for a step whose component calls would do nothing.

``loop.plain_step_applies`` decides whenever the run's listeners change; the plain path must
fire the same events in the same order and reach the same weights, bit for bit, as the full
path it replaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import toy

import treadle
from treadle import loop
from treadle.plugins.precision import BF16Mixed
from treadle.plugins.strategies.single import SingleDevice


class StepEnds:
    """Records each step's loss (after the step, outside it) and drops step 4 from outside."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []

    @treadle.hookimpl
    def on_step_end(self, run: treadle.Run, loss: torch.Tensor) -> None:
        self.calls.append((run.state.step, float(loss)))
        if run.state.step == 3:
            run.skip_step("test: a step dropped from outside it takes the same path")


def _listens_to(event: str) -> object:
    """A plugin with one implementation: ``event``, doing nothing."""

    def impl(self: object, run: treadle.Run) -> None:
        pass

    impl.__name__ = event
    return type(f"Listens_{event}", (), {event: treadle.hookimpl(impl)})()


def _run(tmp_path: Path, **options: Any) -> treadle.Run:
    torch.manual_seed(0)
    config = {"max_steps": 12, "log_every": 4, "output_dir": str(tmp_path)}
    config.update(options.pop("config", {}))
    return treadle.Run(
        toy.model(dropout=0.1),  # dropout: the random stream must be consumed alike too
        toy.train_data(),
        config=treadle.Config(**config),
        loggers=[],
        checkpoint=None,
        optimizer={"name": "adamw", "lr": 0.01},
        scheduler={"name": "linear", "warmup_steps": 2},
        **options,
    )


def _train(tmp_path: Path, plain: bool | None, monkeypatch: pytest.MonkeyPatch, **options: Any):
    """Fit with the plain path forced on, off, or left to decide (None)."""
    decided: list[bool] = []
    real = loop.plain_step_applies

    def decide(run: treadle.Run) -> bool:
        decided.append(real(run))
        return decided[-1] if plain is None else plain

    monkeypatch.setattr(loop, "plain_step_applies", decide)
    events = StepEnds()
    with _run(tmp_path, plugins=[events], **options) as run:
        run.fit()
        weights = {k: v.clone() for k, v in run.model.state_dict().items()}
        state = run.state
    monkeypatch.setattr(loop, "plain_step_applies", real)
    return weights, events.calls, state, decided


def _loss_sum(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> Any:
    error = (outputs["prediction"] - batch["y"]).pow(2)
    return treadle.LossSum(error.sum(), torch.tensor(error.numel()))


@pytest.mark.parametrize("loss_fn", [None, _loss_sum], ids=["model-loss", "loss_fn-LossSum"])
def test_plain_path_matches_the_full_path_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loss_fn: Any
) -> None:
    plain = _train(tmp_path / "plain", True, monkeypatch, loss_fn=loss_fn)
    full = _train(tmp_path / "full", False, monkeypatch, loss_fn=loss_fn)
    assert plain[1] == full[1]  # the same losses, step by step
    assert len(plain[1]) == 12
    for name, tensor in full[0].items():
        assert torch.equal(plain[0][name], tensor), name
    for field in ("step", "micro_step", "samples_seen", "skipped_steps", "batch_in_epoch"):
        assert getattr(plain[2], field) == getattr(full[2], field), field
    assert plain[2].skipped_steps == 1


def test_default_components_take_the_plain_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decided = _train(tmp_path, None, monkeypatch)[3]
    assert decided and all(decided)


class OwnTrainingStep:
    @treadle.hookimpl
    def training_step(self, run: treadle.Run, model: Any, batch: Any) -> torch.Tensor:
        loss = model(**batch)["loss"]
        run.backward(loss)
        return loss


class OwnComputeLoss:
    @treadle.hookimpl
    def compute_loss(self, run: treadle.Run, model: Any, batch: Any) -> torch.Tensor:
        return model(**batch)["loss"]


class MovesBatchesItself(SingleDevice):
    def to_device(self, batch: Any) -> Any:
        return super().to_device(batch)


@pytest.mark.parametrize(
    "options",
    [
        {"config": {"grad_accum_steps": 2}},
        {"config": {"loss_normalization": "tokens"}, "loss_fn": _loss_sum},
        {"plugins": [OwnTrainingStep()]},
        {"plugins": [OwnComputeLoss()]},
        {"precision": BF16Mixed()},
        {"strategy": MovesBatchesItself(device="cpu")},
    ],
    ids=["accumulation", "tokens", "training_step", "compute_loss", "precision", "strategy"],
)
def test_anything_the_plain_path_would_skip_takes_the_full_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    extra = options.pop("plugins", [])
    with _run(tmp_path, plugins=[StepEnds(), *extra], **options) as run:
        assert loop.plain_step_applies(run) is False
        run.fit()
        assert run.state.step == 12


@pytest.mark.parametrize("event", loop._EVENTS_INSIDE_A_STEP)
def test_a_listener_inside_the_step_takes_the_full_path(tmp_path: Path, event: str) -> None:
    with _run(tmp_path) as run:
        assert run._plain_step
        run.add_plugin(_listens_to(event))
        assert not run._plain_step
        run.fit()  # and the event reaches it (the hook-order tests check the order)
        assert run.state.step == 12


def test_a_plugin_added_mid_fit_is_honoured_at_the_next_step(tmp_path: Path) -> None:
    used: list[str] = []

    class Late:
        @treadle.hookimpl
        def compute_loss(self, run: treadle.Run, model: Any, batch: Any) -> torch.Tensor:
            used.append("late")
            return model(**batch)["loss"]

    class AddsAtStep4:
        @treadle.hookimpl
        def on_step_end(self, run: treadle.Run) -> None:
            if run.state.step == 4:
                run.add_plugin(Late())

    with _run(tmp_path, plugins=[AddsAtStep4()]) as run:
        assert run._plain_step
        run.fit()
        assert not run._plain_step
    assert used == ["late"] * 8
