"""Streaming metrics (update/compute/reset) and the ``metrics`` plugin that attaches them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import toy

import treadle
from treadle.errors import ConfigError, TreadleError
from treadle.plugins.metrics import (
    Accuracy,
    Max,
    Mean,
    MeanAbsoluteError,
    MeanSquaredError,
    Metric,
    Metrics,
    Min,
    Perplexity,
    Sum,
    make_metric,
)


def _streamed(metric: Any, batches: list[tuple[Any, ...]]) -> float:
    metric.reset()
    for args in batches:
        metric.update(*args)
    return float(metric.compute())


def _split(*tensors: torch.Tensor, size: int = 3) -> list[tuple[torch.Tensor, ...]]:
    n = len(tensors[0])
    return [tuple(t[i : i + size] for t in tensors) for i in range(0, n, size)]


# ------------------------------------------------------------------ values


def test_accuracy_from_class_scores_indices_and_binary_probabilities() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 4, generator=generator)
    target = torch.randint(0, 4, (10,), generator=generator)
    expected = (logits.argmax(-1) == target).double().mean().item()
    assert _streamed(Accuracy(), _split(logits, target)) == pytest.approx(expected)
    assert _streamed(Accuracy(), _split(logits.argmax(-1), target)) == pytest.approx(expected)

    probabilities = torch.tensor([0.9, 0.2, 0.6, 0.4])
    labels = torch.tensor([1, 0, 0, 0])
    assert _streamed(Accuracy(), [(probabilities, labels)]) == pytest.approx(0.75)
    raw_logits = torch.tensor([3.0, -2.0, 0.5, -0.1])  # outside [0, 1]: sigmoid first
    assert _streamed(Accuracy(), [(raw_logits, labels)]) == pytest.approx(0.75)


def test_accuracy_ignores_masked_targets_like_language_models() -> None:
    logits = torch.zeros(2, 3, 5)
    logits[..., 1] = 1.0  # always predicts token 1
    target = torch.tensor([[1, 2, -100], [1, -100, -100]])
    assert _streamed(Accuracy(), [(logits, target)]) == pytest.approx(2 / 3)
    assert math.isnan(_streamed(Accuracy(), [(logits, torch.full((2, 3), -100))]))


def test_regression_and_aggregate_metrics_equal_the_whole_computation() -> None:
    generator = torch.Generator().manual_seed(1)
    preds, target = torch.randn(11, generator=generator), torch.randn(11, generator=generator)
    batches = _split(preds, target)
    assert _streamed(MeanSquaredError(), batches) == pytest.approx(
        (preds - target).square().mean().item()
    )
    assert _streamed(MeanAbsoluteError(), batches) == pytest.approx(
        (preds - target).abs().mean().item()
    )
    values = _split(preds)
    assert _streamed(Sum(), values) == pytest.approx(preds.sum().item())
    assert _streamed(Max(), values) == preds.max().item()
    assert _streamed(Min(), values) == preds.min().item()
    assert _streamed(Mean(), values) == pytest.approx(preds.mean().item())
    weights = torch.arange(11.0)
    assert _streamed(Mean(), _split(preds, weights)) == pytest.approx(
        ((preds * weights).sum() / weights.sum()).item()
    )


def test_perplexity_is_exp_of_the_mean_token_nll() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 5, 7, generator=generator)
    target = torch.randint(0, 7, (4, 5), generator=generator)
    target[0, :2] = -100
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 7), target.reshape(-1), ignore_index=-100
    )
    assert _streamed(Perplexity(), _split(logits, target, size=2)) == pytest.approx(
        math.exp(nll.item()), rel=1e-6
    )


def test_reset_forgets_and_an_empty_pass_is_nan() -> None:
    metric = MeanSquaredError()
    metric.update(torch.ones(3), torch.zeros(3))
    metric.reset()
    assert math.isnan(float(metric.compute()))
    metric.update(torch.ones(2), torch.ones(2))
    assert float(metric.compute()) == 0.0


def test_mismatched_shapes_name_both() -> None:
    with pytest.raises(ValueError, match=r"\(3,\) and targets of shape \(4,\)"):
        MeanSquaredError().update(torch.zeros(3), torch.zeros(4))


def test_sync_across_reduces_every_state_with_its_operation() -> None:
    calls: list[str] = []

    def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        calls.append(op)
        return tensor * 2 if op == "sum" else tensor + 10  # as if another rank added its own

    mean = Mean()
    mean.update(torch.tensor([1.0, 3.0]))
    mean.sync_across(all_reduce, torch.device("cpu"))
    assert calls == ["sum", "sum"] and float(mean.compute()) == 2.0
    biggest = Max()
    biggest.update(torch.tensor([1.0, 3.0]))
    biggest.sync_across(all_reduce, torch.device("cpu"))
    assert calls[-1] == "max" and float(biggest.compute()) == 13.0


def test_matches_torchmetrics() -> None:
    torchmetrics = pytest.importorskip("torchmetrics", reason="torchmetrics is not installed")
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 5, generator=generator)
    target = torch.randint(0, 5, (20,), generator=generator)
    theirs = torchmetrics.classification.MulticlassAccuracy(num_classes=5, average="micro")
    ours = Accuracy()
    for preds, labels in _split(logits, target, size=6):
        theirs.update(preds, labels)
        ours.update(preds, labels)
    assert float(ours.compute()) == pytest.approx(float(theirs.compute()))
    theirs_mse, ours_mse = torchmetrics.MeanSquaredError(), MeanSquaredError()
    values = torch.randn(9, generator=generator)
    for part in _split(values, size=4):
        theirs_mse.update(part[0], part[0] * 0.5)
        ours_mse.update(part[0], part[0] * 0.5)
    assert float(ours_mse.compute()) == pytest.approx(float(theirs_mse.compute()))


# ------------------------------------------------------------------ the plugin


def _run(tmp_path: Path, plugin: Any) -> treadle.Run:
    torch.manual_seed(0)
    return treadle.Run(
        toy.model(),
        config=treadle.Config(output_dir=str(tmp_path)),
        loggers=[],
        checkpoint=None,
        plugins=[plugin],
    )


def test_plugin_logs_metrics_per_named_set(tmp_path: Path) -> None:
    run = _run(
        tmp_path,
        Metrics({"mse": "mse", "mean_y": Mean()}, adapters={"mean_y": lambda o, b: (b["y"],)}),
    )
    sets = {"a": toy.train_data(n=16, batch_size=8), "b": toy.train_data(n=8, batch_size=4, seed=9)}
    metrics = run.evaluate(sets)
    for name, data in sets.items():
        y = torch.cat([batch["y"] for batch in data])
        assert metrics[f"{name}/mean_y"] == pytest.approx(y.mean().item())
        # the default adapter feeds (model predictions, batch labels): mse is the eval loss
        assert metrics[f"{name}/mse"] == pytest.approx(metrics[f"{name}/loss"], rel=1e-6)


def test_plugin_measures_only_the_chosen_sets(tmp_path: Path) -> None:
    run = _run(tmp_path, Metrics({"mse": MeanSquaredError()}, datasets=["b"]))
    metrics = run.evaluate({"a": toy.train_data(n=8), "b": toy.train_data(n=8)})
    assert "b/mse" in metrics and "a/mse" not in metrics


def test_plugin_accepts_a_torchmetrics_object(tmp_path: Path) -> None:
    torchmetrics = pytest.importorskip("torchmetrics", reason="torchmetrics is not installed")
    run = _run(tmp_path, Metrics({"mae": torchmetrics.MeanAbsoluteError(), "ours": "mae"}))
    metrics = run.evaluate(toy.train_data(n=16, batch_size=8))
    assert metrics["eval/mae"] == pytest.approx(metrics["eval/ours"], rel=1e-6)


def test_plugin_without_predictions_explains_what_to_do(tmp_path: Path) -> None:
    class PluginLoss:  # a plugin's compute_loss: eval_step cannot keep the predictions
        @treadle.hookimpl
        def compute_loss(self, model: torch.nn.Module, batch: Any) -> Any:
            return model(**batch)["loss"]

    run = treadle.Run(
        toy.model(), loggers=[], checkpoint=None,
        config=treadle.Config(output_dir=str(tmp_path)),
        plugins=[PluginLoss(), Metrics({"mse": "mse"})],
    )  # fmt: skip
    with pytest.raises(TreadleError, match=r"no 'predictions'.*give Metrics an adapter"):
        run.evaluate(toy.train_data(n=8))


def test_monitor_a_plugin_metric_tracks_the_best(tmp_path: Path) -> None:
    torch.manual_seed(0)
    run = treadle.Run(
        toy.model(), toy.train_data(n=64), eval_data=toy.train_data(n=16, seed=5),
        config=treadle.Config(max_steps=8, eval_every=2, log_every=0, output_dir=str(tmp_path),
                              monitor="eval/mae"),
        optimizer={"name": "sgd", "lr": 0.05}, loggers=[], checkpoint=None,
        plugins=[history := _History(), Metrics({"mae": "mae"})],
    )  # fmt: skip
    run.fit()
    values = [(m["eval/mae"], m["step"]) for m in history.logged if "eval/mae" in m]
    assert len(values) == 4
    assert (run.state.best_metric, run.state.best_step) == min(values)


class _History:
    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    @treadle.hookimpl
    def on_log(self, metrics: dict[str, float]) -> None:
        self.logged.append(dict(metrics))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"x": "acuracy"}, r"unknown metric 'acuracy'\. Did you mean 'accuracy'\?"),
        (
            {"x": {"name": "accuracy", "bogus": 1}},
            r"metric 'accuracy': invalid options \['bogus'\]",
        ),
        ({"x": object()}, r"lacks update, compute, reset"),
        ({}, r"expected a non-empty mapping"),
    ],
)
def test_invalid_metric_specs(spec: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Metrics(spec)


def test_invalid_plugin_options() -> None:
    with pytest.raises(ConfigError, match=r"adapters names \['nope'\]"):
        Metrics({"a": "mean"}, adapters={"nope": lambda o, b: ()})
    with pytest.raises(ConfigError, match=r"option adapter = 3"):
        Metrics({"a": "mean"}, adapter=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"option datasets = 'eval'"):
        Metrics({"a": "mean"}, datasets="eval")


def test_names_and_options_build_metrics() -> None:
    metric = make_metric({"name": "accuracy", "ignore_index": None})
    assert isinstance(metric, Accuracy) and metric.ignore_index is None
    assert isinstance(make_metric("perplexity"), Perplexity)
    assert isinstance(make_metric(Mean()), Metric)


def test_plugin_by_name_from_a_run_file_spec(tmp_path: Path) -> None:
    from treadle import registry

    if "metrics" not in {e.name for e in registry.installed() if e.kind == "plugin"}:
        pytest.skip("the 'metrics' entry point is not declared in pyproject.toml yet")
    run = _run(tmp_path, {"name": "metrics", "metrics": {"mae": "mae"}})
    assert "eval/mae" in run.evaluate(toy.train_data(n=8))
