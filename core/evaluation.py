"""Evaluation and prediction: ``evaluate`` and ``predict``, with the hooks around each batch."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from treadle import checkpoint
from treadle.data import describe_data, length_of
from treadle.defaults import batch_rows
from treadle.errors import ConfigError, TreadleError, TreadleWarning

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["evaluate", "join_outputs", "predict"]


@contextlib.contextmanager
def _eval_mode(run: Run) -> Iterator[torch.nn.Module]:
    """The run set up and its wrapped model in eval mode, with the listeners refreshed; the
    model's training mode is restored afterwards."""
    run.setup()
    model = run.wrapped_model
    was_training = model.training
    model.eval()
    run.refresh_listeners()
    try:
        yield model
    finally:
        model.train(was_training)


def evaluate(run: Run, data: Any = None) -> dict[str, float]:
    data = run.eval_data if data is None else data
    if data is None:
        raise ConfigError("no evaluation data: pass eval_data to treadle.Run or to evaluate()")
    named = dict(data) if isinstance(data, Mapping) else {"eval": data}
    metrics: dict[str, float] = {}
    # Evaluation leaves the training run's random streams untouched, so that evaluating more
    # or less often (or once more before a final checkpoint) does not change training.
    with _eval_mode(run) as model, torch.no_grad(), checkpoint.rng_preserved(run.device):
        for name, dataset in named.items():
            metrics.update(_evaluate_one(run, model, name, dataset))
    run.fit_state.last_eval_step = run.state.step
    run.log(metrics)
    return metrics


def _evaluate_one(run: Run, model: torch.nn.Module, name: str, data: Any) -> dict[str, float]:
    loader = run.provide("make_eval_loader", run=run, data=data)
    run.fit_state.eval_lengths[name] = length_of(loader)
    run.emit("on_eval_begin", run=run, name=name)
    # predictions and labels can be large: they are kept only for a compute_metrics hook
    keep = "compute_metrics" in run.listeners
    kept: list[Any] = []
    rows = batches = 0
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # the loss's total and count
    steps = run.strategy.eval_steps(
        loader, lambda batch: run.provide("eval_step", run=run, model=model, batch=batch)
    )
    for batch, outputs, counted in steps:
        batches += 1
        if counted:
            _add_loss(run, name, outputs, sums)
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
    total, count = run.strategy.all_reduce(sums, "sum").tolist()
    metrics = {f"{name}/loss": total / max(count, 1)}
    if keep:
        kept = run.strategy.gather_outputs(loader, kept, rows, "compute_metrics")
        joined = join_outputs(kept, "compute_metrics") or {}
        result = run.provide(
            "compute_metrics", optional=True, run=run, name=name,
            predictions=joined.get("predictions"), labels=joined.get("labels"),
        )  # fmt: skip
        metrics.update(_prefixed(name, result or {}))
    run.emit("on_eval_end", run=run, name=name, metrics=metrics)
    return metrics


def _add_loss(run: Run, name: str, outputs: Mapping[str, Any], sums: torch.Tensor) -> None:
    """Add a batch's loss times its ``count`` to ``sums[0]``, and the count to ``sums[1]``."""
    loss, items = outputs["loss"], outputs.get("count", 1)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = f"a {type(loss).__name__}"
        if isinstance(loss, torch.Tensor):
            what = f"a tensor of shape {tuple(loss.shape)}"
        raise TreadleError(
            f"the loss at step {run.state.step} (evaluating {name!r}) is {what}, not one number: "
            "eval_step must give a scalar tensor. Reduce it, e.g. loss.mean()."
        )
    sums[0] += loss.detach().double() * items
    sums[1] += items


def _prefixed(name: str, values: Mapping[str, Any]) -> dict[str, float]:
    metrics = {}
    for key, value in values.items():
        try:
            metrics[key if key.startswith(f"{name}/") else f"{name}/{key}"] = float(value)
        except (TypeError, ValueError):
            raise TreadleError(
                f"compute_metrics returned {key!r} = {value!r} for {name!r}; metrics must be numbers"
            ) from None
    return metrics


def predict(run: Run, data: Any) -> list[Any]:
    with _eval_mode(run) as model:
        loader = run.provide("make_eval_loader", run=run, data=data)
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
        # in a distributed run: every rank's predictions, in the data set's order, re-batched as
        # one process has them
        predictions = run.strategy.gather_outputs(loader, predictions, rows, "predict_step")
        run.emit("on_predict_end", run=run, predictions=predictions)
    return predictions


def join_outputs(parts: list[Any], hook: str) -> Any:
    """Per-batch outputs joined per sample, as ``compute_metrics`` receives them; None for none.

    Tensors are concatenated along their first dimension (a list of rows where their shapes
    differ), lists chained, mappings and tuples joined by key or place. A value that describes
    a whole batch, not one sample each (a 0-dim tensor such as the batch's mean loss, a number,
    a string), is dropped from a mapping and None in a tuple, with a warning.

    Raises:
        TreadleError: ``hook`` returned one such value per batch, not a structure of rows.
    """
    if not parts:
        return None
    dropped: list[str] = []
    joined = _concat(parts, dropped, "")
    if joined is _BATCH_LEVEL:
        raise TreadleError(
            f"{hook} returned one {type(parts[0]).__name__} per batch; outputs are joined per "
            "sample: return tensors with one row per sample, or a dict, tuple or list of them"
        )
    if dropped:
        warnings.warn(
            f"{hook}: values that describe a whole batch, not one sample each, were dropped "
            f"when joining outputs: {', '.join(sorted(set(dropped)))}",
            TreadleWarning,
            stacklevel=4,
        )
    return joined


#: what ``_concat`` returns for values that describe a whole batch
_BATCH_LEVEL = object()


def _concat(parts: list[Any], dropped: list[str], path: str) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return _BATCH_LEVEL
        try:
            return torch.cat(parts)
        except RuntimeError:  # rows of different shapes (sequences of different lengths)
            return [row for part in parts for row in part.unbind(0)]
    if isinstance(first, Mapping):
        joined = {key: _concat([p[key] for p in parts], dropped, f"{path}{key}.") for key in first}
        dropped += [f"{path}{key}" for key, value in joined.items() if value is _BATCH_LEVEL]
        return {key: value for key, value in joined.items() if value is not _BATCH_LEVEL}
    if isinstance(first, tuple):
        items = [_concat([p[n] for p in parts], dropped, f"{path}{n}.") for n in range(len(first))]
        dropped += [f"{path}[{n}]" for n, value in enumerate(items) if value is _BATCH_LEVEL]
        items = [None if value is _BATCH_LEVEL else value for value in items]
        return type(first)(*items) if hasattr(first, "_fields") else tuple(items)
    if isinstance(first, list):
        return [row for part in parts for row in part]
    if first is None:
        return None
    return _BATCH_LEVEL
