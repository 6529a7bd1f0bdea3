"""The step ``loop.build_step`` builds when a fit starts: listeners and components' methods bound,
events nobody listens to and base methods that would do nothing left out. Leaving them out
must not change a bit: a run whose step calls every method and event reaches the same losses,
counters and weights as one whose step skips them; an overriding component and a listener are
called at every step; a plugin added mid-fit counts from the next step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import toy

import treadle
from treadle import loop
from treadle.components import Precision
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


def _loss_sum(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> Any:
    error = (outputs["prediction"] - batch["y"]).pow(2)
    return treadle.LossSum(error.sum(), torch.tensor(error.numel()))


class CallsSuper(SingleDevice):
    """Overrides every method a step calls, doing what the base does: nothing is left out."""

    def __init__(self) -> None:
        super().__init__(device="cpu")
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def to_device(self, batch: Any) -> Any:
        self._count("to_device")
        return super().to_device(batch)

    def finalize_gradients(self, optimizer: Any, divisor: Any) -> None:
        self._count("finalize_gradients")
        super().finalize_gradients(optimizer, divisor)

    def optimizer_step(self, optimizer: Any) -> bool:
        self._count("optimizer_step")
        return super().optimizer_step(optimizer)


class PrecisionCallsSuper(Precision):
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def convert_input(self, batch: Any) -> Any:
        self.calls["convert_input"] = self.calls.get("convert_input", 0) + 1
        return super().convert_input(batch)

    def unscale_gradients(self, optimizer: Any) -> None:
        self.calls["unscale_gradients"] = self.calls.get("unscale_gradients", 0) + 1

    def optimizer_step(self, optimizer: Any) -> bool:
        self.calls["optimizer_step"] = self.calls.get("optimizer_step", 0) + 1
        return super().optimizer_step(optimizer)


def _train(tmp_path: Path, everything: bool, **options: Any) -> Any:
    events = StepEnds()
    plugins: list[Any] = [events]
    if everything:
        plugins += [_listens_to(event) for event in loop._EVENTS_OF_A_STEP]
        options.update(strategy=CallsSuper(), precision=PrecisionCallsSuper())
    with _run(tmp_path, plugins=plugins, **options) as run:
        run.fit()
        weights = {k: v.clone() for k, v in run.model.state_dict().items()}
        return weights, events.calls, run.state, run.strategy


@pytest.mark.parametrize(
    "options",
    [{}, {"loss_fn": _loss_sum}, {"config": {"grad_accum_steps": 2}},
     {"config": {"loss_normalization": "tokens"}, "loss_fn": _loss_sum}],
    ids=["model-loss", "loss_fn-LossSum", "accumulation", "tokens"],
)  # fmt: skip
def test_a_step_that_leaves_calls_out_matches_one_that_makes_them_bit_for_bit(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    lean = _train(tmp_path / "lean", False, **options)
    full = _train(tmp_path / "full", True, **options)
    assert lean[1] == full[1]  # the same losses, step by step
    assert len(lean[1]) == 12
    for name, tensor in full[0].items():
        assert torch.equal(lean[0][name], tensor), name
    for field in ("step", "micro_step", "samples_seen", "skipped_steps", "batch_in_epoch",
                  "tokens_seen"):  # fmt: skip
        assert getattr(lean[2], field) == getattr(full[2], field), field
    assert lean[2].skipped_steps == 1


def test_methods_a_component_overrides_are_called_at_every_step(tmp_path: Path) -> None:
    _, _, state, strategy = _train(tmp_path, True, config={"grad_accum_steps": 2})
    micro_batches = state.micro_step
    assert strategy.calls == {"to_device": micro_batches, "finalize_gradients": 12,
                              "optimizer_step": 11}  # fmt: skip  # step 4 was skipped
    assert strategy.precision.calls == {"convert_input": micro_batches,
                                        "unscale_gradients": 12, "optimizer_step": 11}  # fmt: skip


@pytest.mark.parametrize("event", [*loop._EVENTS_OF_A_STEP, "on_before_backward",
                                   "on_after_backward"])  # fmt: skip
def test_a_listener_inside_the_step_is_called_at_every_step(tmp_path: Path, event: str) -> None:
    calls: list[int] = []

    def impl(self: object, run: treadle.Run) -> None:
        calls.append(run.state.step)

    impl.__name__ = event
    with _run(tmp_path) as run:
        run.add_plugin(type(f"Listens_{event}", (), {event: treadle.hookimpl(impl)})())
        run.fit()
    assert sorted(set(calls)) == list(range(12))


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
        run.fit()
    assert used == ["late"] * 8
