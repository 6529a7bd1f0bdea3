"""Events nobody listens to are not dispatched through pluggy during the loop.

How this is measured: pluggy's ``add_hookcall_monitoring`` wraps the plugin manager's single
dispatch function, so it sees every hook call that goes through pluggy. After a fit, the set
of hooks it saw must be exactly the hooks that have an implementation outside the kernel's
own defaults (which the kernel calls directly when they are alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import toy

import treadle


class OnlyStepEnd:
    def __init__(self) -> None:
        self.count = 0

    @treadle.hookimpl
    def on_step_end(self) -> None:
        self.count += 1


def _monitored_fit(tmp_path: Path, **run_options: Any) -> list[str]:
    run = treadle.Run(
        toy.model(),
        toy.train_data(),
        eval_data=toy.train_data(n=16),
        config=treadle.Config(
            max_steps=10, log_every=2, eval_every=5, save_every=5, output_dir=str(tmp_path)
        ),
        **run_options,
    )
    dispatched: list[str] = []
    run.plugin_manager.add_hookcall_monitoring(
        lambda hook_name, impls, kwargs: dispatched.append(hook_name), lambda *a: None
    )
    run.fit()
    return dispatched


def test_only_hooks_with_listeners_are_dispatched(tmp_path: Path) -> None:
    plugin = OnlyStepEnd()
    dispatched = _monitored_fit(tmp_path, loggers=[], checkpoint=None, plugins=[plugin])
    assert plugin.count == 10
    assert set(dispatched) == {"on_step_end"}
    assert len(dispatched) == 10


def test_no_plugins_means_no_pluggy_dispatch_at_all(tmp_path: Path) -> None:
    assert _monitored_fit(tmp_path, loggers=[], checkpoint=None) == []


def test_a_provider_override_goes_through_pluggy_and_wins(tmp_path: Path) -> None:
    calls = []

    class DoubleLoss:
        @treadle.hookimpl
        def compute_loss(self, model: Any, batch: Any) -> Any:
            calls.append(1)
            return model(**batch)["loss"] * 2

    dispatched = _monitored_fit(tmp_path, loggers=[], checkpoint=None, plugins=[DoubleLoss()])
    assert len(calls) == 10 + 2 * 2  # 10 steps + evals at steps 5 and 10 (2 batches each)
    assert set(dispatched) == {"compute_loss"}
