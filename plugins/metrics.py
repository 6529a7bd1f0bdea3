"""Streaming evaluation metrics, and ``metrics``: the plugin that attaches them to a run.

A metric object has the interface torchmetrics made standard: ``update(...)`` once per batch,
``compute()`` at the end of a pass, ``reset()`` before the next one. This module's metrics
(:class:`Accuracy`, :class:`Mean`, :class:`Sum`, :class:`Max`, :class:`Min`,
:class:`MeanSquaredError`, :class:`MeanAbsoluteError`, :class:`Perplexity`) need nothing but
torch; a torchmetrics object (or anything with those three methods) works in their place::

    from treadle.plugins.metrics import Accuracy, Metrics

    run = treadle.Run(..., eval_data=val, plugins=[Metrics({"accuracy": Accuracy()})])
    run.evaluate()          # {"eval/loss": ..., "eval/accuracy": ...}

How a batch reaches a metric: the plugin calls ``metric.update(*adapter(outputs, batch))``,
where ``outputs`` is what ``eval_step`` returned. The default adapter passes
``(outputs["predictions"], outputs["labels"])``, which the kernel's ``eval_step`` fills from the
model's ``logits`` / ``predictions`` and the batch's ``labels`` / ``target`` / ``y`` (or second
item). Give ``adapter=`` (one for all metrics) or ``adapters={"name": fn}`` for anything else.

Decisions:

* **State stays on the device; nothing is read per batch.** ``update`` adds to float64 tensors
  on the inputs' device; the one host-device synchronisation is ``compute()`` at the end.
* **Distributed**: at the end of a pass the states of this module's metrics are summed (or
  max/min-reduced) across ranks with ``run.strategy.all_reduce``; a torchmetrics object syncs
  itself in ``compute()``. Distributed samplers pad the last batches with up to
  ``world_size - 1`` repeated samples, which streaming metrics count (as torchmetrics with a
  ``DistributedSampler`` does). The ``compute_metrics`` hook sees every sample exactly once.
* An empty pass (nothing counted) computes ``nan``, not 0: a missing value cannot pass for a
  bad or a perfect score.
* ``Accuracy`` ignores targets equal to ``ignore_index`` (-100 by default, the Hugging Face
  label-masking convention) and takes class scores along the **last** dimension, as language
  models produce them (torchmetrics' multiclass metrics expect them along dimension 1).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from treadle.errors import ConfigError, TreadleError
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = [
    "Accuracy",
    "Max",
    "Mean",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "Metric",
    "Metrics",
    "Min",
    "Perplexity",
    "Sum",
    "default_adapter",
    "make_metric",
]

_INITIAL = {"sum": 0.0, "max": -math.inf, "min": math.inf}


class Metric:
    """Base of this module's metrics: float64 states, each with the reduction across ranks.

    Subclasses list their states in ``states`` (name → ``"sum"``, ``"max"`` or ``"min"``),
    add to them in ``update`` with :meth:`_add` / :meth:`_extreme`, and read them in
    ``compute``.
    """

    states: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        self._values: dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Forget everything seen (states back to their initial values, on the CPU)."""
        self._values = {
            name: torch.tensor(_INITIAL[op], dtype=torch.float64)
            for name, op in self.states.items()
        }

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def compute(self) -> torch.Tensor:
        raise NotImplementedError

    def sync_across(
        self, all_reduce: Callable[[torch.Tensor, str], torch.Tensor], device: torch.device
    ) -> None:
        """Reduce the states across ranks in place (once, before ``compute``)."""
        for name, op in self.states.items():
            self._values[name] = all_reduce(self._values[name].to(device), op)

    def _add(self, name: str, value: torch.Tensor) -> None:
        self._values[name] = self._values[name].to(value.device) + value.double()

    def _extreme(self, name: str, value: torch.Tensor) -> None:
        current = self._values[name].to(value.device)
        pick = torch.maximum if self.states[name] == "max" else torch.minimum
        self._values[name] = pick(current, value.double())

    def _ratio(self, numerator: str, denominator: str) -> torch.Tensor:
        top, bottom = self._values[numerator], self._values[denominator]
        return torch.where(bottom > 0, top / bottom.clamp_min(1e-300), torch.nan)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _tensor(value: Any) -> torch.Tensor:
    return value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)


class Mean(Metric):
    """The (weighted) mean of every value given: ``update(value, weight=1.0)``."""

    states = {"total": "sum", "weight": "sum"}

    def update(self, value: Any, weight: Any = 1.0) -> None:
        value = _tensor(value).double()
        weight = _tensor(weight).double().to(value.device).expand_as(value)
        self._add("total", (value * weight).sum())
        self._add("weight", weight.sum())

    def compute(self) -> torch.Tensor:
        return self._ratio("total", "weight")


class Sum(Metric):
    """The sum of every value given: ``update(value)``."""

    states = {"total": "sum"}

    def update(self, value: Any) -> None:
        self._add("total", _tensor(value).double().sum())

    def compute(self) -> torch.Tensor:
        return self._values["total"].clone()


class Max(Metric):
    """The largest value given: ``update(value)``; ``-inf`` before any."""

    states = {"value": "max"}

    def update(self, value: Any) -> None:
        value = _tensor(value)
        if value.numel():
            self._extreme("value", value.double().max())

    def compute(self) -> torch.Tensor:
        return self._values["value"].clone()


class Min(Metric):
    """The smallest value given: ``update(value)``; ``inf`` before any."""

    states = {"value": "min"}

    def update(self, value: Any) -> None:
        value = _tensor(value)
        if value.numel():
            self._extreme("value", value.double().min())

    def compute(self) -> torch.Tensor:
        return self._values["value"].clone()


def _pair(preds: Any, target: Any, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    preds, target = _tensor(preds), _tensor(target).to(_tensor(preds).device)
    if preds.shape != target.shape:
        raise ValueError(
            f"{metric}: predictions of shape {tuple(preds.shape)} and targets of shape "
            f"{tuple(target.shape)} differ; pass one prediction per target (an adapter can "
            "squeeze or select)"
        )
    return preds, target


class MeanSquaredError(Metric):
    """Mean of ``(preds - target) ** 2`` over every element: ``update(preds, target)``."""

    states = {"total": "sum", "count": "sum"}

    def update(self, preds: Any, target: Any) -> None:
        preds, target = _pair(preds, target, "MeanSquaredError")
        self._add("total", (preds.double() - target.double()).square().sum())
        self._add("count", torch.tensor(float(target.numel()), device=preds.device))

    def compute(self) -> torch.Tensor:
        return self._ratio("total", "count")


class MeanAbsoluteError(Metric):
    """Mean of ``|preds - target|`` over every element: ``update(preds, target)``."""

    states = {"total": "sum", "count": "sum"}

    def update(self, preds: Any, target: Any) -> None:
        preds, target = _pair(preds, target, "MeanAbsoluteError")
        self._add("total", (preds.double() - target.double()).abs().sum())
        self._add("count", torch.tensor(float(target.numel()), device=preds.device))

    def compute(self) -> torch.Tensor:
        return self._ratio("total", "count")


class Accuracy(Metric):
    """The fraction of targets predicted exactly: ``update(preds, target)``.

    ``preds`` may be class indices (the shape of ``target``), class scores (one more, last,
    dimension: the arg-max is taken), or, for integer 0/1 targets, probabilities or logits of
    the positive class (the shape of ``target``; values outside [0, 1] go through a sigmoid
    first, as torchmetrics does).

    Args:
        ignore_index: targets with this value are not counted (None: count every target).
        threshold: the probability from which a binary prediction is positive.
    """

    states = {"correct": "sum", "total": "sum"}

    def __init__(self, ignore_index: int | None = -100, threshold: float = 0.5) -> None:
        self.ignore_index = ignore_index
        self.threshold = threshold
        super().__init__()

    def update(self, preds: Any, target: Any) -> None:
        preds, target = _tensor(preds), _tensor(target)
        target = target.to(preds.device)
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(dim=-1)
        elif preds.is_floating_point() and not target.is_floating_point():
            if preds.numel() and (preds.min() < 0 or preds.max() > 1):
                preds = preds.sigmoid()
            preds = (preds >= self.threshold).to(target.dtype)
        preds, target = _pair(preds, target, "Accuracy")
        counted = (
            torch.ones_like(target, dtype=torch.bool)
            if self.ignore_index is None
            else target != self.ignore_index
        )
        self._add("correct", ((preds == target) & counted).sum())
        self._add("total", counted.sum())

    def compute(self) -> torch.Tensor:
        return self._ratio("correct", "total")

    def __repr__(self) -> str:
        return f"Accuracy(ignore_index={self.ignore_index}, threshold={self.threshold})"


class Perplexity(Metric):
    """``exp`` of the mean negative log-likelihood of the targets: ``update(logits, target)``.

    ``logits`` has the shape of ``target`` plus a last dimension of class scores (``(N, T, V)``
    for ``(N, T)`` token targets); targets equal to ``ignore_index`` are not counted.
    """

    states = {"nll": "sum", "count": "sum"}

    def __init__(self, ignore_index: int | None = -100) -> None:
        self.ignore_index = ignore_index
        super().__init__()

    def update(self, preds: Any, target: Any) -> None:
        logits = _tensor(preds)
        target = _tensor(target).to(logits.device).long()
        if logits.dim() != target.dim() + 1 or logits.shape[:-1] != target.shape:
            raise ValueError(
                f"Perplexity: logits of shape {tuple(logits.shape)} do not match targets of "
                f"shape {tuple(target.shape)}: expected the targets' shape plus a class dimension"
            )
        flat_logits, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
        ignore = -100 if self.ignore_index is None else self.ignore_index
        nll = torch.nn.functional.cross_entropy(
            flat_logits.double(), flat_target, ignore_index=ignore, reduction="sum"
        )
        self._add("nll", nll)
        self._add("count", (flat_target != ignore).sum())

    def compute(self) -> torch.Tensor:
        return self._ratio("nll", "count").exp()


#: The names a metric can be given by (in a run file or ``Metrics({"acc": "accuracy"})``).
METRICS: dict[str, type[Metric]] = {
    "accuracy": Accuracy,
    "mean": Mean,
    "sum": Sum,
    "max": Max,
    "min": Min,
    "mse": MeanSquaredError,
    "mae": MeanAbsoluteError,
    "perplexity": Perplexity,
}


def make_metric(spec: Any) -> Any:
    """A metric from an object with ``update``/``compute``/``reset``, a name of :data:`METRICS`
    or ``{"name": ..., **options}``.

    Raises:
        ConfigError: an unknown name, invalid options, or an object without those methods.
    """
    if isinstance(spec, str | Mapping):
        options = {"name": spec} if isinstance(spec, str) else dict(spec)
        name = options.pop("name", None)
        if name not in METRICS:
            close = difflib.get_close_matches(str(name), METRICS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown metric {name!r}.{hint} Known metrics: {', '.join(METRICS)}; or pass "
                "an object with update(), compute() and reset() (a torchmetrics metric)"
            )
        try:
            return METRICS[name](**options)
        except TypeError as exc:
            raise ConfigError(
                f"metric {name!r}: invalid options {sorted(options)}: {exc}"
            ) from None
    missing = [m for m in ("update", "compute", "reset") if not callable(getattr(spec, m, None))]
    if missing:
        raise ConfigError(
            f"metric {spec!r} lacks {', '.join(missing)}: pass a metric object with update(), "
            f"compute() and reset(), or one of the names {', '.join(METRICS)}"
        )
    return spec


def default_adapter(outputs: Mapping[str, Any], batch: Any) -> tuple[Any, Any]:
    """``(outputs["predictions"], outputs["labels"])``, the arguments of ``metric.update``."""
    missing = [key for key in ("predictions", "labels") if outputs.get(key) is None]
    if missing:
        raise TreadleError(
            f"metrics: eval_step returned no {' and no '.join(repr(m) for m in missing)} "
            f"(it returned {sorted(outputs)}). The default eval_step takes them from the model's "
            "'logits'/'predictions' and the batch's 'labels'/'target'/'y' (or second item); "
            "return them from your eval_step, or give Metrics an adapter(outputs, batch)"
        )
    return outputs["predictions"], outputs["labels"]


def _callable(option: str, value: Any) -> Callable[..., Any]:
    if isinstance(value, str):  # an import path from a run file
        from treadle.registry import import_path

        value = import_path(value)
    if not callable(value):
        raise ConfigError(
            f"metrics option {option} = {value!r} is not allowed: expected a function "
            "(outputs, batch) -> arguments of update(), or its 'package.module:function' path"
        )
    return value  # type: ignore[no-any-return]


class Metrics:
    """Streaming metrics on every evaluation, logged as ``"{data set}/{metric name}"``.

    Args:
        metrics: metric name → a metric object (this module's or torchmetrics'), a name of
            :data:`METRICS` or ``{"name": ..., **options}``.
        adapter: ``adapter(outputs, batch)`` → the arguments of ``update`` (a tuple), for every
            metric; default :func:`default_adapter`. An import path is accepted.
        adapters: per-metric adapters, by metric name, overriding ``adapter``.
        datasets: the evaluation sets to measure (their names); None: all of them.
    """

    name: ClassVar[str] = "metrics"

    def __init__(
        self,
        metrics: Mapping[str, Any],
        adapter: Callable[[Mapping[str, Any], Any], Sequence[Any]] | str | None = None,
        adapters: Mapping[str, Callable[[Mapping[str, Any], Any], Sequence[Any]] | str]
        | None = None,
        datasets: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(metrics, Mapping) or not metrics:
            raise ConfigError(
                f"metrics option metrics = {metrics!r} is not allowed: expected a non-empty "
                "mapping of names to metrics, e.g. {'accuracy': 'accuracy'}"
            )
        self.metrics: dict[str, Any] = {
            str(key): make_metric(spec) for key, spec in metrics.items()
        }
        common = default_adapter if adapter is None else _callable("adapter", adapter)
        unknown = sorted(set(adapters or {}) - set(self.metrics))
        if unknown:
            raise ConfigError(
                f"metrics option adapters names {unknown}, which are not metrics "
                f"({', '.join(self.metrics)})"
            )
        self.adapters = {
            key: _callable(f"adapters[{key!r}]", (adapters or {})[key])
            if key in (adapters or {})
            else common
            for key in self.metrics
        }
        if datasets is not None and (
            isinstance(datasets, str) or not all(isinstance(d, str) for d in datasets)
        ):
            raise ConfigError(
                f"metrics option datasets = {datasets!r} is not allowed: expected a list of "
                "evaluation set names, or None for all"
            )
        self.datasets = None if datasets is None else set(datasets)

    def _measures(self, name: str) -> bool:
        return self.datasets is None or name in self.datasets

    @hookimpl
    def on_eval_begin(self, run: Run, name: str) -> None:
        if not self._measures(name):
            return
        for metric in self.metrics.values():
            metric.reset()
            if not isinstance(metric, Metric) and callable(getattr(metric, "to", None)):
                metric.to(run.device)  # a torchmetrics object keeps its states on its device

    @hookimpl
    def on_eval_step_end(self, run: Run, name: str, batch: Any, outputs: Mapping[str, Any]) -> None:
        if not self._measures(name):
            return
        cache: dict[Any, Sequence[Any]] = {}
        for key, metric in self.metrics.items():
            adapter = self.adapters[key]
            if adapter not in cache:
                cache[adapter] = adapter(outputs, batch)
            metric.update(*cache[adapter])

    @hookimpl
    def on_eval_end(self, run: Run, name: str, metrics: dict[str, float]) -> None:
        if not self._measures(name):
            return
        for key, metric in self.metrics.items():
            if isinstance(metric, Metric) and run.strategy.world_size > 1:
                metric.sync_across(run.strategy.all_reduce, run.device)
            value = metric.compute()
            if isinstance(value, Mapping):  # a torchmetrics MetricCollection
                for sub, item in value.items():
                    metrics[f"{name}/{key}/{sub}"] = float(item)
            else:
                metrics[f"{name}/{key}"] = float(value)
