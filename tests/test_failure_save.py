"""An exception escaping ``fit`` writes an emergency checkpoint of the last completed step when
that is safe (one process, not inside the optimizer step, the step not saved yet), and never
overwrites a good checkpoint; the original error is raised, with a note naming the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import toy

import treadle
from treadle import checkpoint

MAX_STEPS = 8


def make_run(out: Path, *plugins: Any, train_data: Any = None, **options: Any) -> treadle.Run:
    config = {"max_steps": MAX_STEPS, "log_every": 1, "output_dir": str(out), "resume": "auto"}
    config.update(options.pop("config", {}))
    torch.manual_seed(0)
    return treadle.Run(
        toy.model(),
        train_data if train_data is not None else toy.train_data(n=64),
        config=treadle.Config(**config),
        optimizer=options.pop("optimizer", {"name": "adamw", "lr": 0.01}),
        scheduler={"name": "linear", "warmup_steps": 2},
        loggers=[],
        plugins=list(plugins),
        **options,
    )


class RaiseAt:
    """Raises ValueError in ``hook`` at step ``at``."""

    def __init__(self, hook: str, at: int) -> None:
        self.at = at

        def impl(run: treadle.Run) -> None:
            if run.state.step == self.at:
                raise ValueError(f"boom at step {self.at}")

        setattr(self, hook, treadle.hookimpl(specname=hook)(impl))


def steps_on_disk(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


@pytest.mark.timeout(120)
def test_a_failing_hook_leaves_an_emergency_checkpoint_that_resumes(tmp_path: Path) -> None:
    whole = make_run(tmp_path / "whole")
    whole.fit()

    out = tmp_path / "failed"
    with pytest.raises(treadle.PluginError, match=r"boom at step 5") as caught:
        make_run(out, RaiseAt("on_step_end", 5)).fit()
    saved = out / "checkpoints" / "step-000005"
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert f"wrote an emergency checkpoint of step 5 (the last completed step) to {saved}" in notes
    assert checkpoint.verify(saved) == []
    meta = json.loads((saved / "state.json").read_text())
    assert meta["emergency"] == "ValueError: boom at step 5" and meta["stopped"] is None

    resumed = make_run(out)
    resumed.fit()
    assert resumed.state.step == MAX_STEPS
    expected, actual = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


@pytest.mark.timeout(120)
def test_a_failing_data_loader_and_forward_save_the_last_completed_step(tmp_path: Path) -> None:
    def failing_batches() -> Iterator[dict[str, torch.Tensor]]:
        for index, batch in enumerate(toy.train_data(n=64)):
            if index == 3:
                raise OSError("the data share went away")
            yield batch

    class Loader:  # re-iterable, with a length: a DataLoader whose worker fails
        def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
            return failing_batches()

        def __len__(self) -> int:
            return 8

    with pytest.raises(OSError, match="data share") as caught:
        make_run(tmp_path / "data", train_data=Loader()).fit()
    assert steps_on_disk(tmp_path / "data") == ["step-000003"]
    assert "emergency checkpoint of step 3" in "\n".join(caught.value.__notes__)

    class FailingForward(toy.Regression):
        calls = 0

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            FailingForward.calls += 1
            if FailingForward.calls == 6:  # the second micro-batch of step 3's window
                raise RuntimeError("CUDA error: an illegal memory access")
            return super().forward(x, y)

    torch.manual_seed(0)
    run = treadle.Run(
        FailingForward(),
        toy.train_data(n=64),
        config=treadle.Config(max_steps=4, grad_accum_steps=2, output_dir=str(tmp_path / "fw")),
        loggers=[],
    )
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run.fit()
    assert steps_on_disk(tmp_path / "fw") == ["step-000002"]
    assert all(p.grad is None for p in run.model.parameters())  # the partial step's, dropped


class HalfwayOptimizer(torch.optim.SGD):
    """Updates the first parameter, then fails: the weights are half-updated."""

    def __init__(self, params: Any, fail_at: int) -> None:
        super().__init__(params, lr=0.1)
        self.fail_at, self.steps = fail_at, 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.steps += 1
        if self.steps == self.fail_at:
            first = self.param_groups[0]["params"][0]
            first.add_(first.grad, alpha=-0.1)
            raise RuntimeError("optimizer failed half-way")
        super().step()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("plain", [True, False], ids=["no-step-listener", "step-listener"])
def test_no_checkpoint_after_a_failure_inside_the_optimizer_step(
    tmp_path: Path, plain: bool
) -> None:
    class Listen:  # an event inside the step: the built step calls it
        @treadle.hookimpl
        def on_step_begin(self) -> None:
            pass

    plugins = [] if plain else [Listen()]
    run = make_run(
        tmp_path,
        *plugins,
        optimizer=lambda model: HalfwayOptimizer(model.parameters(), fail_at=5),
        config={"save_every": 3},
    )
    with pytest.raises(RuntimeError, match="half-way") as caught:
        run.fit()
    assert run.state.step == 4
    assert steps_on_disk(tmp_path) == ["step-000003"]
    notes = "\n".join(caught.value.__notes__)
    assert "no emergency checkpoint was written: it happened in the optimizer step" in notes


@pytest.mark.timeout(120)
def test_no_checkpoint_after_a_failure_right_after_the_optimizer_step(tmp_path: Path) -> None:
    # on_after_optimizer_step: the weights moved, the step's counters not yet
    with pytest.raises(treadle.PluginError, match="boom at step 4"):
        make_run(tmp_path, RaiseAt("on_after_optimizer_step", 4), config={"save_every": 3}).fit()
    assert steps_on_disk(tmp_path) == ["step-000003"]


@pytest.mark.timeout(120)
def test_a_good_checkpoint_of_the_same_step_is_kept(tmp_path: Path) -> None:
    make_run(tmp_path, config={"max_steps": 5}).fit()  # an earlier run's step-000005
    kept = tmp_path / "checkpoints" / "step-000005" / "state.json"
    before = kept.read_bytes()
    with pytest.raises(treadle.PluginError) as caught:
        make_run(tmp_path, RaiseAt("on_step_end", 5), config={"resume": None}).fit()
    assert kept.read_bytes() == before
    assert "step-000005 exists and is kept" in "\n".join(caught.value.__notes__)


@pytest.mark.timeout(120)
def test_a_failing_emergency_save_keeps_the_original_error(tmp_path: Path) -> None:
    class BadState:
        @treadle.hookimpl
        def on_save_checkpoint(self, plugin_state: dict[str, Any]) -> None:
            plugin_state["bad"] = object()  # not storable

    with pytest.raises(treadle.PluginError, match="boom at step 2") as caught:
        make_run(tmp_path, RaiseAt("on_step_end", 2), BadState()).fit()
    notes = "\n".join(caught.value.__notes__)
    assert "writing an emergency checkpoint of step 2 failed too: TreadleError" in notes
    assert steps_on_disk(tmp_path) == []


@pytest.mark.timeout(120)
def test_interrupts_are_not_failures(tmp_path: Path) -> None:
    class Interrupt:
        @treadle.hookimpl
        def on_step_end(self, run: treadle.Run) -> None:
            if run.state.step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_run(tmp_path, Interrupt()).fit()
    assert not (tmp_path / "checkpoints").exists()
