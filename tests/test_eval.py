"""Evaluation: during fit and alone, named data sets, compute_metrics, best metric, early stopping."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import toy

import treadle
from treadle import testing
from treadle.errors import TreadleError
from treadle.plugins.callbacks.early_stopping import EarlyStopping
from treadle.plugins.metrics import MeanAbsoluteError, Metrics


class EvalRecorder:
    """Records the evaluation hooks in order, and the weights each evaluation saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.logged: list[dict[str, float]] = []

    @treadle.hookimpl
    def on_eval_begin(self, run: treadle.Run, name: str) -> None:
        self.calls.append(("on_eval_begin", name))
        self.weights[run.state.step] = copy.deepcopy(run.model.state_dict())

    @treadle.hookimpl
    def on_eval_step_end(self, name: str, outputs: dict[str, Any]) -> None:
        self.calls.append(("on_eval_step_end", name))
        assert {"loss", "count", "predictions", "labels"} <= set(outputs)

    @treadle.hookimpl
    def compute_metrics(self, name: str, predictions: torch.Tensor, labels: torch.Tensor) -> Any:
        self.calls.append(("compute_metrics", name))
        return {"max_error": float((predictions - labels).abs().max()), "rows": len(labels)}

    @treadle.hookimpl
    def on_eval_end(self, name: str, metrics: dict[str, float]) -> None:
        self.calls.append(("on_eval_end", name))

    @treadle.hookimpl
    def on_log(self, metrics: dict[str, float]) -> None:
        self.calls.append(("on_log", None))
        self.logged.append(dict(metrics))


def _run(tmp_path: Path, plugins: list[Any], **config: Any) -> treadle.Run:
    torch.manual_seed(0)
    settings = {"max_steps": 6, "log_every": 0, "output_dir": str(tmp_path)} | config
    return treadle.Run(
        toy.model(),
        toy.train_data(n=48, batch_size=8),
        eval_data=toy.train_data(n=20, batch_size=8, seed=7),  # 3 batches: 8, 8, 4
        config=treadle.Config(**settings),
        optimizer={"name": "sgd", "lr": 0.1},
        loggers=[],
        checkpoint=None,
        plugins=plugins,
    )


def test_eval_every_n_fires_the_hooks_and_matches_a_separate_evaluate(tmp_path: Path) -> None:
    recorder = EvalRecorder()
    metrics_plugin = Metrics({"mae": MeanAbsoluteError()})
    run = _run(tmp_path, [recorder, metrics_plugin], eval_every=2, eval_at_end=False)
    run.fit()

    one_pass = [
        ("on_eval_begin", "eval"),
        *[("on_eval_step_end", "eval")] * 3,
        ("compute_metrics", "eval"),
        ("on_eval_end", "eval"),
        ("on_log", None),
    ]
    # evaluations at steps 2, 4, 6; with log_every=0 training is logged once, at the end
    assert recorder.calls == [*one_pass * 3, ("on_log", None)]
    assert sorted(recorder.weights) == [2, 4, 6]
    during_fit = [m for m in recorder.logged if "eval/loss" in m]
    assert [m["step"] for m in during_fit] == [2, 4, 6]

    # the same weights, evaluated by a fresh run's evaluate(), give identical metrics
    for logged in during_fit:
        fresh_model = toy.model()
        fresh_model.load_state_dict(recorder.weights[int(logged["step"])])
        fresh = treadle.Run(
            fresh_model,
            config=treadle.Config(output_dir=str(tmp_path / "fresh")),
            loggers=[],
            checkpoint=None,
            plugins=[EvalRecorder(), Metrics({"mae": MeanAbsoluteError()})],
        )
        alone = fresh.evaluate(toy.train_data(n=20, batch_size=8, seed=7))
        expected = {k: v for k, v in logged.items() if k not in ("step", "epoch")}
        assert alone == expected
        assert set(alone) == {"eval/loss", "eval/mae", "eval/max_error", "eval/rows"}
        assert alone["eval/rows"] == 20


def test_training_log_at_the_end_only_with_log_every_zero(tmp_path: Path) -> None:
    recorder = EvalRecorder()
    run = _run(tmp_path, [recorder], eval_every=3)
    run.fit()
    training = [m for m in recorder.logged if "loss" in m]
    assert [m["step"] for m in training] == [6]


def test_named_eval_sets_are_prefixed_and_evaluated_in_order(tmp_path: Path) -> None:
    recorder = EvalRecorder()
    run = _run(tmp_path, [recorder], max_steps=2, eval_every=2)
    named = {"val": toy.train_data(n=16, batch_size=8), "test": toy.train_data(n=8, batch_size=8)}
    metrics = run.evaluate(named)
    assert set(metrics) == {
        "val/loss", "val/max_error", "val/rows", "test/loss", "test/max_error", "test/rows",
    }  # fmt: skip
    assert metrics["val/rows"] == 16 and metrics["test/rows"] == 8
    begins = [name for hook, name in recorder.calls if hook == "on_eval_begin"]
    assert begins == ["val", "test"]
    assert recorder.logged[-1] == {"step": 0, "epoch": 0, **metrics}


def test_eval_every_epoch(tmp_path: Path) -> None:
    recorder = EvalRecorder()
    run = _run(tmp_path, [recorder], max_steps=None, max_epochs=2, eval_every_epoch=True)
    run.fit()
    steps = [m["step"] for m in recorder.logged if "eval/loss" in m]
    assert steps == [6, 12]  # 6 batches per epoch; the end does not evaluate twice


def test_compute_metrics_sees_every_prediction_and_label_in_order(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    class Capture:
        @treadle.hookimpl
        def compute_metrics(self, predictions: torch.Tensor, labels: torch.Tensor) -> Any:
            seen["predictions"], seen["labels"] = predictions, labels
            return {}

    run = _run(tmp_path, [Capture()])
    data = toy.train_data(n=20, batch_size=8, seed=7)
    metrics = run.evaluate(data)
    assert set(metrics) == {"eval/loss"}  # an empty result adds nothing
    with torch.no_grad():
        outputs = [run.model(**run.strategy.to_device(batch)) for batch in data]
    expected = torch.cat([output["prediction"] for output in outputs])
    assert torch.equal(seen["predictions"], expected)  # on the run's device, in order
    assert torch.equal(seen["labels"].cpu(), torch.cat([batch["y"] for batch in data]))


def test_compute_metrics_with_a_plugin_loss_gets_labels_but_no_predictions(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    class PluginLoss:
        @treadle.hookimpl
        def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
            return model(**batch)["loss"] * 2

        @treadle.hookimpl
        def compute_metrics(self, predictions: Any, labels: Any) -> Any:
            seen["predictions"], seen["labels"] = predictions, labels
            return {"n": len(labels)}

    run = _run(tmp_path, [PluginLoss()])
    metrics = run.evaluate(toy.train_data(n=20, batch_size=8))
    assert seen["predictions"] is None and seen["labels"].shape == (20,)
    assert metrics["eval/n"] == 20


def test_compute_metrics_must_return_numbers(tmp_path: Path) -> None:
    class Bad:
        @treadle.hookimpl
        def compute_metrics(self) -> Any:
            return {"text": "not a number"}

    run = _run(tmp_path, [Bad()])
    with pytest.raises(TreadleError, match=r"compute_metrics returned 'text' = 'not a number'"):
        run.evaluate(toy.train_data(n=8, batch_size=8))


def test_predictions_are_not_kept_without_compute_metrics(tmp_path: Path) -> None:
    run = _run(tmp_path, [])
    assert "compute_metrics" not in run.listeners  # nothing to keep them for


# ------------------------------------------------------------------ best metric, early stopping


class Scripted:
    """compute_metrics returning a scripted sequence of ``score`` values, one per evaluation."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    @treadle.hookimpl
    def compute_metrics(self) -> dict[str, float]:
        return {"score": self.values.pop(0)}


def test_best_metric_and_step_are_tracked_in_state(tmp_path: Path) -> None:
    values = [0.5, 0.7, math.nan, 0.65, 0.9, 0.8]
    run = _run(tmp_path, [Scripted(values)], eval_every=1, monitor="eval/score", monitor_mode="max")
    run.fit()
    assert run.state.best_metric == 0.9
    assert run.state.best_step == 5
    assert run.state.last_metrics["eval/score"] == 0.8


def test_a_non_finite_first_value_is_never_the_best(tmp_path: Path) -> None:
    run = _run(tmp_path, [Scripted([math.nan, 2.0, 1.0, 3.0, 1.5, 4.0])], eval_every=1,
               monitor="eval/score")  # fmt: skip
    run.fit()
    assert (run.state.best_metric, run.state.best_step) == (1.0, 3)


@pytest.mark.parametrize(
    ("values", "mode", "patience", "threshold", "stop_at"),
    [
        # min: 1.0 (best), 0.99 (not 0.05 better: bad), 0.9 (better), 0.88 (bad), 0.87 (bad)
        ([1.0, 0.99, 0.9, 0.88, 0.87, 0.5, 0.4, 0.3], "min", 2, 0.05, 5),
        # max, no threshold: 1, 2 (best), 2 (equal: bad), 1.5 (bad), 1.9 (bad)
        ([1.0, 2.0, 2.0, 1.5, 1.9, 3.0, 4.0, 5.0], "max", 3, 0.0, 5),
    ],
)
def test_early_stopping_stops_at_the_expected_step(
    tmp_path: Path, values: list[float], mode: str, patience: int, threshold: float, stop_at: int
) -> None:
    stopper = EarlyStopping(monitor="eval/score", mode=mode, patience=patience, threshold=threshold)
    run = _run(tmp_path, [Scripted(values), stopper], max_steps=8, eval_every=1)
    state = run.fit()
    assert stopper.stopped_step == stop_at
    assert state.step == stop_at  # the request is acted on at the boundary of that same step
    assert state.stop_reason is not None and state.stop_reason.startswith("early stopping")


# ------------------------------------------------------------------ the sampler's padding


class Float64Rows(torch.utils.data.Dataset):
    """``n`` rows of {"x", "y"} in float64: losses over different batchings agree to ~1e-16."""

    def __init__(self, n: int) -> None:
        x, y = toy.samples(n, seed=7)
        self.x, self.y = x.double(), y.double()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index]}


class PassRecorder:
    """Per evaluation pass: the rows of every forward, of every batch the hooks saw, and of
    what compute_metrics received."""

    def __init__(self) -> None:
        self.forwards: list[int] = []
        self.hook_rows: list[int] = []
        self.hook_counts: list[int] = []
        self.metric_rows = -1

    def forward_pre_hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.forwards.append(len(kwargs["x"]))

    @treadle.hookimpl
    def on_eval_step_end(self, batch: dict[str, torch.Tensor], outputs: dict[str, Any]) -> None:
        self.hook_rows.append(len(batch["x"]))
        self.hook_counts.append(int(outputs["count"]))
        assert len(outputs["predictions"]) == len(outputs["labels"]) == len(batch["x"])

    @treadle.hookimpl
    def compute_metrics(self, labels: torch.Tensor) -> dict[str, float]:
        self.metric_rows = len(labels)
        return {}


#: (sampler, batch size, rank 1's forwards, rows rank 1's hooks see) per pass, 7 rows on 2
#: ranks: treadle's ResumableSampler (with batch 3 and 1, rank 1 ends with a batch of padding
#: only: it is forwarded and seen empty), and torch's DistributedSampler given by the user.
PADDING_CASES = [
    ("resumable", 2, [2, 1], [2, 1]),
    ("resumable", 3, [3, 1], [3, 0]),
    ("resumable", 1, [1, 1, 1, 1], [1, 1, 1, 0]),
    ("torch", 2, [2, 1], [2, 1]),
]


def eval_on_ranks(length: int) -> list[dict[str, Any]]:
    """A two-process worker: evaluate ``length`` rows once per case of PADDING_CASES."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    from treadle.plugins.metrics import Mean
    from treadle.plugins.strategies.ddp import DDPStrategy

    torch.manual_seed(0)
    model = toy.model().double()
    recorder = PassRecorder()
    model.register_forward_pre_hook(recorder.forward_pre_hook, with_kwargs=True)
    mean_y = Metrics({"mean_y": Mean()}, adapter=lambda outputs, batch: (batch["y"],))
    run = treadle.Run(
        model,
        strategy=DDPStrategy(device="cpu"),
        loggers=[],
        checkpoint=None,
        plugins=[recorder, mean_y],
    )
    dataset, results = Float64Rows(length), []
    with run:
        for sampler, batch_size, _, _ in PADDING_CASES:
            if sampler == "torch":
                shard = DistributedSampler(
                    dataset, num_replicas=2, rank=dist.get_rank(), shuffle=False
                )
                data = DataLoader(dataset, batch_size=batch_size, sampler=shard)
            else:
                data = DataLoader(dataset, batch_size=batch_size)  # treadle shards it
            recorder.__init__()  # type: ignore[misc]
            metrics = run.evaluate(data)
            results.append({"metrics": metrics, **vars(recorder)})
    return results


@pytest.mark.multiprocess
def test_two_ranks_evaluate_each_sample_once_despite_the_samplers_padding() -> None:
    length = 7  # 2 ranks: rank 1's share ends with a repeat of sample 0
    results = testing.run_distributed(eval_on_ranks, length, world_size=2)
    dataset = Float64Rows(length)
    torch.manual_seed(0)
    model = toy.model().double()
    with torch.no_grad():
        per_sample = (model.net(dataset.x).squeeze(-1) - dataset.y).square()
    exact, padded = per_sample.mean(), torch.cat([per_sample, per_sample[:1]]).mean()
    assert abs(float(padded - exact)) > 1e-4  # counting the padding would be seen
    for index, (_, batch_size, forwards, rows) in enumerate(PADDING_CASES):
        # the one-process loss over the same loader, batched the same way
        single = treadle.Run(model, loggers=[], checkpoint=None)
        expected = single.evaluate(torch.utils.data.DataLoader(dataset, batch_size=batch_size))
        assert expected["eval/loss"] == pytest.approx(float(exact), rel=1e-13, abs=0)
        rank0 = [len(chunk) for chunk in torch.arange(4).split(batch_size)]  # positions 0, 2, 4, 6
        for rank, result in enumerate(r[index] for r in results):
            metrics = result["metrics"]
            assert metrics["eval/loss"] == pytest.approx(expected["eval/loss"], rel=1e-13, abs=0)
            # streaming metrics and compute_metrics see each sample once too
            assert metrics["eval/mean_y"] == pytest.approx(float(dataset.y.mean()), rel=1e-13)
            assert result["metric_rows"] == length
            # the ranks forward alike (a batch of padding only included), and hooks see real rows
            assert result["forwards"] == (rank0 if rank == 0 else forwards)
            assert result["hook_rows"] == result["hook_counts"] == (rank0 if rank == 0 else rows)
