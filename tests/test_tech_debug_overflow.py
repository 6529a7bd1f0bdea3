"""``debug-overflow``: a planted overflow is traced to its module, with the frames before it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import toy
from torch import nn

import treadle
from treadle.errors import ConfigError
from treadle.plugins.techniques.debug_overflow import DebugOverflow, OverflowDetected


class Blow(nn.Module):
    """Multiplies by ``factor`` from its ``at``-th call on (1e39 is inf in float32)."""

    def __init__(self, at: int, factor: float = 1e39) -> None:
        super().__init__()
        self.at, self.factor, self.calls = at, factor, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.factor if self.calls >= self.at else x


class Planted(nn.Module):
    def __init__(self, blow: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), blow, nn.Linear(8, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        prediction = self.net(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(prediction, y)}


def make_run(
    model: nn.Module, tmp_path: Path, *plugins: Any, eval_data: Any = None, **config: Any
) -> treadle.Run:
    torch.manual_seed(0)
    return treadle.Run(
        model,
        toy.train_data(),
        eval_data=eval_data,
        config=treadle.Config(
            **{"max_steps": 5, "log_every": 0, "output_dir": str(tmp_path), **config}
        ),
        optimizer={"name": "sgd", "lr": 0.01},
        checkpoint=None,
        loggers=[],
        plugins=list(plugins),
    )


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_module_that_overflows_is_named_with_the_frames_before(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Planted(Blow(at=3))
    run = make_run(model, tmp_path, DebugOverflow(max_frames_to_save=4))
    with pytest.raises(OverflowDetected) as caught:
        run.fit()
    error = caught.value
    assert (error.module_name, error.module_class) == ("net.2", "Blow")
    message = str(error)
    assert "module 'net.2' (Blow) produced inf/NaN during batch number 2 (step 2)" in message
    assert len(error.frames) == 4
    assert "net.0 Linear" in message and "net.1 Tanh" in message  # the frames before it
    assert error.frames[-1].splitlines()[0].strip() == "net.2 Blow"
    assert " inf output" in error.frames[-1]
    assert run.state.step == 2  # raised before the bad step's backward and update
    assert hooks_left(model) == 0


def test_nan_produced_by_forward_code_names_the_enclosing_module(tmp_path: Path) -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            x = x * float("nan")  # not a module: the next module's input is the first bad value
            return {"loss": nn.functional.mse_loss(self.inner(x).squeeze(-1), y)}

    run = make_run(Functional(), tmp_path, DebugOverflow())
    with pytest.raises(OverflowDetected, match=r"an input of module 'inner' \(Linear\)") as caught:
        run.fit()
    assert "the forward code of '(model)' (Functional)" in str(caught.value)


def test_a_clean_model_trains_and_the_hooks_go(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Planted(Blow(at=10**9))
    plugin = DebugOverflow()
    run = make_run(model, tmp_path, plugin, eval_data=toy.train_data(n=16), eval_every=2)
    run.fit()
    assert run.state.step == 5
    # 5 training forwards and 3 evaluations (steps 2, 4 and the end) of 2 batches: 11 passes
    assert plugin.batch_number == 10
    assert hooks_left(model) == 0
    run.evaluate()  # after fit: no hooks, nothing counted
    assert plugin.batch_number == 10 and hooks_left(model) == 0


def test_without_the_plugin_the_overflow_goes_unnoticed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    run = make_run(Planted(Blow(at=3)), tmp_path)
    with pytest.warns(treadle.TreadleWarning, match="nan|inf"):
        run.fit(log_every=5)


def test_trace_and_abort(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    run = make_run(
        Planted(Blow(at=10**9)),
        tmp_path,
        DebugOverflow(trace_batch_nums=[1], abort_after_batch_num=2),
    )
    run.fit()
    assert run.state.step == 3  # batches 0, 1, 2
    assert "abort_after_batch_num=2" in (run.state.stop_reason or "")
    printed = capsys.readouterr().out
    assert printed.count("net.0 Linear") == 1 and "(model) Planted" in printed


def test_found_by_name_and_options_checked(tmp_path: Path) -> None:
    run = make_run(Planted(Blow(at=2)), tmp_path, {"name": "debug-overflow"})
    with pytest.raises(OverflowDetected):
        run.fit()
    with pytest.raises(ConfigError, match="max_frames_to_save"):
        DebugOverflow(max_frames_to_save=0)
    with pytest.raises(ConfigError, match="trace_batch_nums"):
        DebugOverflow(trace_batch_nums=[-1])
