"""Evaluation and prediction: ``evaluate`` and ``predict``, with the hooks around each batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from treadle import checkpoint, defaults, gather
from treadle.data import describe_data, length_of
from treadle.defaults import batch_rows
from treadle.errors import ConfigError, TreadleError

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["evaluate", "predict"]


def evaluate(run: Run, data: Any = None) -> dict[str, float]:
    run.setup()
    data = run.eval_data if data is None else data
    if data is None:
        raise ConfigError("no evaluation data: pass eval_data to treadle.Run or to evaluate()")
    named = dict(data) if isinstance(data, Mapping) else {"eval": data}
    model = run.wrapped_model
    was_training = model.training
    model.eval()
    run._refresh_listeners()
    metrics: dict[str, float] = {}
    # Evaluation leaves the training run's random streams untouched, so that evaluating more
    # or less often (or once more before a final checkpoint) does not change training.
    with torch.no_grad(), checkpoint.rng_preserved(run.device):
        for name, dataset in named.items():
            metrics.update(_evaluate_one(run, model, name, dataset))
    model.train(was_training)
    run._last_eval_step = run.state.step
    run.log(metrics)
    return metrics


def _evaluate_one(run: Run, model: torch.nn.Module, name: str, data: Any) -> dict[str, float]:
    strategy = run.strategy
    loader = run.provide("make_eval_loader", run=run, data=data)
    run._eval_lengths[name] = length_of(loader)
    run.emit("on_eval_begin", run=run, name=name)
    # predictions and labels can be large: they are kept only for a compute_metrics hook
    keep = "compute_metrics" in run._listeners
    kept: list[Any] = []
    rows = 0
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    count = torch.zeros((), dtype=torch.float64, device=run.device)
    # A sharded loader ends a rank's share with up to one repeated sample (the sampler's
    # padding to a multiple of the world size). It is cut off, so that the loss, the kept
    # outputs and the hooks see each sample once. None: every row is real (one process).
    left = gather.real_rows(run, loader)
    batches = 0
    for batch in loader:
        batches += 1
        batch = strategy.to_device(batch)
        real = None  # with padding in this batch: how many of its rows are real
        if left is not None:
            size = batch_rows(batch)
            if size > left:
                real = left
            left = max(left - size, 0)
        if real:
            batch = gather.first_rows(batch, real, size)
        outputs = run.provide("eval_step", run=run, model=model, batch=batch)
        if real == 0:
            # Padding only: the forward still ran, so that wrappers using collectives in it
            # (FSDP) stay in step across ranks; it counts for nothing and is seen empty.
            batch = gather.first_rows(batch, 0, size)
            outputs = {**gather.first_rows(outputs, 0, size), "count": 0}
        else:
            items = outputs.get("count", 1)
            try:
                total += outputs["loss"].detach().double() * items
            except (RuntimeError, AttributeError) as exc:
                raise defaults.loss_error(run, outputs["loss"], exc, evaluating=name) from exc
            count += items
        if keep:
            kept.append({key: outputs.get(key) for key in ("predictions", "labels")})
            rows += batch_rows(batch)
        run.emit("on_eval_step_end", run=run, name=name, batch=batch, outputs=outputs)
    if not batches:  # every rank alike: a sharded loader gives each rank as many batches
        raise TreadleError(
            f"eval set {name!r} yielded no batch (evaluating at step {run.state.step}): it is "
            f"{describe_data(data)}. Its loss would be logged as 0.0; pass data with at least "
            "one batch, or leave it out of eval_data."
        )
    total, count = strategy.all_reduce(total, "sum"), strategy.all_reduce(count, "sum")
    metrics = {f"{name}/loss": float((total / count.clamp_min(1)).item())}
    if keep:
        joined = gather.collect(run, loader, kept, rows, "compute_metrics") or {}
        result = run.provide(
            "compute_metrics", optional=True, run=run, name=name,
            predictions=joined.get("predictions"), labels=joined.get("labels"),
        )  # fmt: skip
        metrics.update(_prefixed(name, result or {}))
    run.emit("on_eval_end", run=run, name=name, metrics=metrics)
    return metrics


def _prefixed(name: str, values: Mapping[str, Any]) -> dict[str, float]:
    metrics = {}
    for key, value in values.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TreadleError(
                f"compute_metrics returned {key!r} = {value!r} for {name!r}; metrics must be numbers"
            ) from None
        metrics[key if key.startswith(f"{name}/") else f"{name}/{key}"] = number
    return metrics


def predict(run: Run, data: Any) -> list[Any]:
    run.setup()
    loader = run.provide("make_eval_loader", run=run, data=data)
    model = run.wrapped_model
    was_training = model.training
    model.eval()
    run._refresh_listeners()
    predictions: list[Any] = []
    rows = 0
    run.emit("on_predict_begin", run=run)
    with torch.no_grad():
        for batch in loader:
            batch = run.strategy.to_device(batch)
            outputs = run.provide("predict_step", run=run, model=model, batch=batch)
            predictions.append(outputs)
            rows += batch_rows(batch)
            run.emit("on_predict_step_end", run=run, batch=batch, outputs=outputs)
    if gather.layout(run, loader) is not None:
        # every rank's predictions, in the data set's order, re-batched as one process has them
        ordered = gather.collect(run, loader, predictions, rows, "predict_step")
        size = loader.batch_size
        predictions = [
            gather.take(ordered, slice(i, i + size))
            for i in range(0, gather.row_count(ordered), size)
        ]
    run.emit("on_predict_end", run=run, predictions=predictions)
    model.train(was_training)
    return predictions
