"""The conformance suites of ``treadle.testing``: first-party components pass them, and a
component broken in the way a check is about fails that check."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import treadle
from treadle.plugins.checkpoint.directory import DirectoryStore
from treadle.plugins.checkpoint.torch_format import TorchFormat
from treadle.plugins.loggers.jsonl import JsonlLogger
from treadle.testing import (
    CallbackConformance,
    CheckpointConformance,
    LoggerConformance,
    OptimizerConformance,
    PrecisionConformance,
    SchedulerConformance,
    StoreConformance,
)

ROOT = Path(__file__).parents[1]


class TestBF16True(PrecisionConformance):
    precision = "bf16-true"


class TestSGD(OptimizerConformance):
    optimizer = {"name": "sgd", "momentum": 0.9}
    options = {"lr": 0.1}


class TestCosine(SchedulerConformance):
    scheduler = {"name": "cosine", "warmup_steps": 2}


class TestJsonl(LoggerConformance):
    logger = JsonlLogger


class TestTorchFormat(CheckpointConformance):
    checkpoint = TorchFormat


class TestGradClip(CallbackConformance):
    plugin = {"name": "grad-clip", "max_norm": 0.5}


class TestDirectoryStore(StoreConformance):
    store = "directory"


# ---------------------------------------------------------------- broken components fail


class _ForgetsItsScale(treadle.Precision):
    name = "forgets"

    def __init__(self) -> None:
        self.scale = 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale + 1}  # not what load_state_dict restores

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale = float(state["scale"])


def _frozen_too(model: torch.nn.Module, /, **options: Any) -> torch.optim.Optimizer:
    head = list(model.head.parameters())  # leaves every other trainable parameter out
    return torch.optim.SGD(head, lr=0.1)


def _stateless_schedule(optimizer: torch.optim.Optimizer, /, *, total_steps: int) -> Any:
    class Schedule:
        steps = 0

        def step(self) -> None:
            self.steps += 1
            for group in optimizer.param_groups:
                group["lr"] = 0.1 / (1 + self.steps)

        def state_dict(self) -> dict[str, Any]:
            return {}  # the step count is lost

        def load_state_dict(self, state: Mapping[str, Any]) -> None:
            pass

    return Schedule()


class _NoFinish(treadle.Logger):
    name = "no-finish"

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    @treadle.hookimpl
    def on_exception(self, run: Any) -> None:
        pass  # overrides the base's: finish is not called when the fit fails


class _LosesDtype(TorchFormat):
    name = "loses-dtype"

    def load_tensors(self, directory: Path, stem: str) -> dict[str, torch.Tensor]:
        return {k: v.float() for k, v in super().load_tensors(directory, stem).items()}


class _DropsOptimizerState(DirectoryStore):
    name = "drops-optimizer-state"

    def write(self, run: Any, snapshot: Any, *, background: bool = False) -> Path:
        return super().write(run, snapshot._replace(optimizer=None), background=background)


class _WrongArgument:
    @treadle.hookimpl
    def on_step_end(self, run: Any, los: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("suite", "attribute", "component", "check", "message"),
    [
        (PrecisionConformance, "precision", _ForgetsItsScale,
         "test_state_is_json_and_loads_back", "changed the state"),
        (OptimizerConformance, "optimizer", _frozen_too,
         "test_covers_each_trainable_parameter_once", "not optimised"),
        (SchedulerConformance, "scheduler", _stateless_schedule,
         "test_state_dict_restores_the_schedule", "restored schedule"),
        (LoggerConformance, "logger", _NoFinish,
         "test_finish_is_called_when_the_fit_fails", "finish"),
        (CheckpointConformance, "checkpoint", _LosesDtype,
         "test_tensors_round_trip", "came back"),
        (CallbackConformance, "plugin", _WrongArgument,
         "test_implements_real_hooks_with_real_arguments", "los"),
        (StoreConformance, "store", _DropsOptimizerState,
         "test_resume_continues_bit_for_bit", "differs from the uninterrupted run"),
    ],
)  # fmt: skip
def test_a_broken_component_fails_its_check(
    suite: type, attribute: str, component: Any, check: str, message: str
) -> None:
    subclass = type("TestBroken", (suite,), {attribute: staticmethod(component)})
    with pytest.raises(AssertionError, match=message):
        getattr(subclass(), check)()


def test_a_lost_optimizer_state_fails_the_resume_check() -> None:
    class Suite(OptimizerConformance):
        # a fresh SGD-with-momentum whose state the checkpoint does not get back
        @staticmethod
        def optimizer(model: torch.nn.Module, /, **options: Any) -> torch.optim.Optimizer:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            optimizer.load_state_dict = lambda state: None  # type: ignore[method-assign]
            return optimizer

    with pytest.raises(AssertionError, match="differs from the uninterrupted run"):
        Suite().test_resumes_bit_for_bit()


@pytest.mark.parametrize("page", sorted((ROOT / "docs" / "authoring").glob("*.md")))
def test_the_author_guide_examples_run(page: Path, tmp_path: Path) -> None:
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
        if block.startswith("# not run:"):
            continue
        result = subprocess.run(
            [sys.executable, "-c", block], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert result.returncode == 0, f"{page.name}:\n{block}\n{result.stderr[-2000:]}"
