"""The ``lr-finder`` technique plugin: a learning-rate range test before the first step."""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import toy

import treadle
from treadle.plugins.techniques.lr_finder import LRFinder, suggest_lr

pytestmark = pytest.mark.timeout(120)


class Linear(torch.nn.Module):
    """``y = x @ w``: with whitened inputs the MSE's Hessian is 2·I, so plain gradient descent
    converges fastest at lr 0.5 and diverges above lr 1."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(8, 1, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.w(x).squeeze(-1), y)}


def _whitened_regression() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    x = x - x.mean(0)
    # whiten: E[x xᵀ] = I exactly, so the Hessian of the MSE is 2·I
    covariance = x.T @ x / len(x)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(covariance)).T
    y = x @ torch.randn(8, generator=generator)
    return [{"x": x, "y": y}]  # one full batch: gradient descent, no sampling noise


def _run(tmp_path: Path, plugins: list[Any], **options: Any) -> treadle.Run:
    config = {"max_steps": 4, "output_dir": str(tmp_path / "out"), "log_every": 0, "seed": 3}
    config.update(options.pop("config", {}))
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "loggers": [],
        "checkpoint": None,
    }
    kwargs.update(options)
    model = kwargs.pop("model", None) or toy.model(dropout=0.2)
    data = kwargs.pop("data", None) or toy.dataset()
    return treadle.Run(
        model, data, config=treadle.Config(batch_size=8, **config), plugins=plugins, **kwargs
    )


class Probe:
    """Copies of what the finder must leave untouched: before it (``on_fit_begin`` runs
    before the finder's, which is ``trylast``) and after it (``on_epoch_begin``)."""

    def __init__(self) -> None:
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}

    @staticmethod
    def _take(run: treadle.Run) -> dict[str, Any]:
        assert run.optimizer is not None
        return {
            "weights": {k: v.clone() for k, v in run.model.state_dict().items()},
            "optimizer": copy.deepcopy(run.optimizer.state_dict()),
            "scheduler": copy.deepcopy(run.scheduler.state_dict()) if run.scheduler else None,
            "rng": torch.get_rng_state(),
            "grads": [p.grad for p in run.model.parameters()],
        }

    @treadle.hookimpl
    def on_fit_begin(self, run: treadle.Run) -> None:
        self.before = self._take(run)

    @treadle.hookimpl
    def on_epoch_begin(self, run: treadle.Run) -> None:
        if not self.after:
            self.after = self._take(run)


def _identical(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    return bool(a == b)


def test_model_optimizer_scheduler_and_rng_are_restored_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = toy.model(dropout=0.2)
    # an optimizer with state already (as a user's pre-warmed one): the finder must restore it
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**toy.train_data()[0])["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    probe, finder = Probe(), LRFinder(num_training=20, skip_begin=2, plot=False)
    run = _run(
        tmp_path,
        [probe, finder],
        model=model,
        optimizer=optimizer,
        scheduler={"name": "cosine", "warmup_steps": 2},
        config={"max_steps": 3},
    )
    run.fit()
    assert len(finder.results["lr"]) > 2  # the test did train
    assert probe.before["optimizer"]["state"]  # non-trivial optimizer state
    assert _identical(probe.before, probe.after)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_fit_after_the_finder_equals_a_fit_without_it(tmp_path: Path, accumulation: int) -> None:
    config = {"max_steps": 5, "grad_accum_steps": accumulation}
    plain = _run(tmp_path / "a", [], config=config)
    plain.fit()
    finder = LRFinder(num_training=15, skip_begin=2, plot=False)
    tested = _run(tmp_path / "b", [finder], config=config)
    tested.fit()
    assert finder.suggested_lr is not None
    assert tested.optimizer is not None and plain.optimizer is not None
    assert tested.optimizer.param_groups[0]["lr"] == plain.optimizer.param_groups[0]["lr"]
    assert _identical(plain.model.state_dict(), tested.model.state_dict())
    assert _identical(plain.optimizer.state_dict(), tested.optimizer.state_dict())


def test_suggestion_on_a_problem_whose_best_lr_is_known(tmp_path: Path) -> None:
    finder = LRFinder(min_lr=1e-5, max_lr=10.0, num_training=80, plot=False)
    run = _run(
        tmp_path,
        [finder],
        model=Linear(),
        data=_whitened_regression(),
        optimizer={"name": "sgd", "lr": 1e-3},
        config={"max_steps": 1},
    )
    run.fit()
    lr = finder.suggested_lr
    assert lr is not None and 1e-5 <= lr <= 10.0
    # gradient descent here converges fastest at 0.5 and diverges above 1: the steepest fall
    # of the loss lies below that, within a decade or so
    assert 0.02 <= lr <= 1.0, lr
    # the divergence above lr 1 stopped the test before max_lr
    assert len(finder.results["lr"]) < 80 and finder.results["lr"][-1] > 1.0


def test_files_and_log(tmp_path: Path) -> None:
    finder = LRFinder(num_training=20, skip_begin=2)
    run = _run(tmp_path, [finder], loggers=["jsonl"], config={"max_steps": 1})
    run.fit()
    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "lr_finder.csv").open()))
    assert len(rows) == len(finder.results["lr"]) and float(rows[0]["lr"]) == 1e-8
    document = json.loads((out / "lr_finder.json").read_text())
    assert document["suggested_lr"] == finder.suggested_lr
    assert document["lr"] == finder.results["lr"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "lr_finder/suggested_lr" in r]
    assert len(logged) == 1 and logged[0]["lr_finder/suggested_lr"] == finder.suggested_lr
    assert logged[0]["step"] == 0
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (treadle[plot])")
    assert (out / "lr_finder.png").read_bytes().startswith(b"\x89PNG")


def test_without_matplotlib_the_plot_is_a_warning_and_the_data_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.warns(treadle.TreadleWarning, match="matplotlib is not installed"):
        _run(tmp_path, [LRFinder(num_training=12, skip_begin=2)], config={"max_steps": 1}).fit()
    assert (tmp_path / "out" / "lr_finder.json").is_file()
    assert not (tmp_path / "out" / "lr_finder.png").exists()


def test_apply_sets_the_lr_and_the_schedule_follows(tmp_path: Path) -> None:
    finder = LRFinder(min_lr=1e-4, num_training=20, skip_begin=2, apply=True, plot=False)
    run = _run(tmp_path, [finder], optimizer={"name": "sgd", "lr": 1e-3}, config={"max_steps": 1})
    run.fit()
    assert run.optimizer is not None and finder.suggested_lr is not None
    assert finder.suggested_lr != 1e-3
    assert {g["lr"] for g in run.optimizer.param_groups} == {finder.suggested_lr}

    finder, probe = (
        LRFinder(min_lr=1e-4, num_training=20, skip_begin=2, apply=True, plot=False),
        Probe(),
    )
    run = _run(
        tmp_path / "s",
        [probe, finder],
        optimizer={"name": "sgd", "lr": 1e-3},
        scheduler={"name": "constant-with-warmup", "warmup_steps": 2},
        config={"max_steps": 3},
    )
    run.fit()
    assert run.optimizer is not None and finder.suggested_lr is not None
    assert run.scheduler.base_lrs == [finder.suggested_lr] * len(run.optimizer.param_groups)
    assert probe.before["optimizer"]["param_groups"][0]["lr"] == 0.0  # warm-up starts at 0
    assert probe.after["optimizer"]["param_groups"][0]["lr"] == 0.0  # ... and still does
    assert probe.after["optimizer"]["param_groups"][0]["initial_lr"] == finder.suggested_lr
    # past the warm-up, the schedule's peak is the suggestion
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(finder.suggested_lr)


def test_resume_does_not_rerun_it(tmp_path: Path) -> None:
    first = LRFinder(num_training=12, skip_begin=2, apply=True, plot=False)
    config = {"max_steps": 4, "save_every": 2, "resume": "auto"}
    _run(tmp_path, [first], checkpoint="safetensors", config=config).fit()
    assert first.done and first.suggested_lr is not None

    again = LRFinder(num_training=12, skip_begin=2, apply=True, plot=False)
    (tmp_path / "out" / "lr_finder.json").unlink()
    resumed = _run(tmp_path, [again], checkpoint="safetensors", config={**config, "max_steps": 6})
    with warnings.catch_warnings():
        warnings.simplefilter("error", treadle.TreadleWarning)
        resumed.fit()
    assert resumed.state.step == 6
    assert again.done and again.results["lr"] == []  # not run again
    assert again.suggested_lr == first.suggested_lr and again.applied
    assert not (tmp_path / "out" / "lr_finder.json").exists()
    assert resumed.optimizer is not None
    assert resumed.optimizer.param_groups[0]["lr"] == first.suggested_lr


def test_a_fit_that_starts_past_step_zero_without_a_result_warns(tmp_path: Path) -> None:
    run = _run(tmp_path, [], config={"max_steps": 2})
    run.fit()
    finder = LRFinder(num_training=12, skip_begin=2, plot=False)
    run.add_plugin(finder)
    with pytest.warns(treadle.TreadleWarning, match="starts at step 2"):
        run.fit(max_steps=3)
    assert not finder.done


def test_early_stop_and_threshold_none(tmp_path: Path) -> None:
    def finder_run(folder: str, **options: Any) -> list[float]:
        finder = LRFinder(
            min_lr=1.1, max_lr=1.5, num_training=40, beta=0.5, skip_begin=2, plot=False, **options
        )
        _run(
            tmp_path / folder,
            [finder],
            model=Linear(),
            data=_whitened_regression(),
            optimizer={"name": "sgd", "lr": 1e-3},
            config={"max_steps": 1},
        ).fit()
        return finder.results["smoothed_loss"]

    stopped = finder_run("a")  # above lr 1 it diverges, finitely: stopped by the threshold
    assert 4 < len(stopped) < 40
    assert all(math.isfinite(v) for v in stopped)
    assert stopped[-1] > 4 * min(stopped[:-1]) and max(stopped[:-1]) <= 4 * min(stopped[:-1])
    everything = finder_run("b", early_stop_threshold=None)
    assert len(everything) == 40


def test_schedule_endpoints() -> None:
    exponential = LRFinder(min_lr=1e-6, max_lr=1.0, num_training=7, skip_begin=0)
    assert exponential.lr_at(0) == 1e-6 and exponential.lr_at(6) == pytest.approx(1.0)
    assert exponential.lr_at(3) == pytest.approx(1e-3)
    linear = LRFinder(min_lr=0.1, max_lr=0.7, num_training=7, skip_begin=0, mode="linear")
    assert [round(linear.lr_at(i), 6) for i in range(7)] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def test_suggest_lr_picks_the_steepest_fall() -> None:
    lrs = [10.0**e for e in range(-6, 1)]
    losses = [5.0, 5.0, 4.9, 3.0, 2.5, 2.4, 9.0]
    assert suggest_lr(lrs, losses, skip_begin=0, skip_end=0) == 1e-3
    assert suggest_lr(lrs, losses[:1] + [float("nan")] * 6, skip_begin=0, skip_end=0) is None


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"min_lr": 0}, "min_lr = 0"),
        ({"max_lr": float("inf")}, "max_lr = inf"),
        ({"min_lr": 1e-2, "max_lr": 1e-3}, "above min_lr"),
        ({"num_training": 1}, "num_training = 1"),
        ({"num_training": 10}, "fewer than 2 points"),
        ({"mode": "cosine"}, "mode = 'cosine'"),
        ({"early_stop_threshold": 0.5}, "early_stop_threshold"),
        ({"beta": 1.0}, "beta = 1.0"),
        ({"skip_end": -1}, "skip_end = -1"),
        ({"apply": "yes"}, "apply = 'yes'"),
        ({"data": {"x": 1}}, "data"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], match: str) -> None:
    with pytest.raises(treadle.ConfigError, match=match):
        LRFinder(**options)


def test_by_name(tmp_path: Path) -> None:
    run = _run(
        tmp_path,
        [{"name": "lr-finder", "num_training": 12, "skip_begin": 2, "plot": False}],
        config={"max_steps": 1},
    )
    run.fit()
    assert json.loads((tmp_path / "out" / "lr_finder.json").read_text())["suggested_lr"]
