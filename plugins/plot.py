"""``treadle plot RUN_DIR``: one PNG of a run's metrics against step, from its ``metrics.jsonl``.

Up to five panels, each drawn only when the log has its metrics:

* **loss**: the training ``loss`` and every evaluation loss (``<set>/loss``);
* **learning rate**: ``lr`` and every ``lr/<group>`` (log scale when all are positive);
* **evaluation metrics**: every other ``<set>/<metric>`` an evaluation logged;
* **throughput**: ``samples_per_s``, ``tokens_per_s`` and the ``throughput/*`` rates;
* **memory**: the ``memory/*`` figures.

A metric logged several times at one step (a resumed run re-logging steps) is drawn with its
last value. Drawing uses matplotlib's object API with the Agg canvas (no display, and no change
to pyplot's global backend); matplotlib is an extra: ``pip install "treadle[plot]"``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from treadle.errors import ConfigError, require

__all__ = ["group_series", "plot_run", "read_metrics"]

_SKIP = {"step", "epoch", "time"}
_RATES = {"samples_per_s", "tokens_per_s"}


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a file, or a run directory holding one); lines that
    do not parse (a crash's torn last line) are skipped.

    Raises:
        ConfigError: there is no such file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"no metrics log at {path}: give a run's output directory (with the jsonl logger "
            "enabled, loggers=[..., 'jsonl']) or its metrics.jsonl"
        )
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _panel(key: str) -> str | None:
    """The panel a metric is drawn in, or None for one that is not drawn."""
    if key in _SKIP:
        return None
    if key == "loss" or key.endswith("/loss"):
        return "loss"
    if key == "lr" or key.startswith("lr/"):
        return "learning rate"
    if key.removeprefix("throughput/") in _RATES:
        return "throughput"
    if key.startswith("memory/"):
        return "memory (MiB)"
    if "/" not in key or key.startswith(("throughput/", "momentum/", "weight_decay/")):
        return None  # step time, FLOPs, plugins' own top-level numbers: no panel of their own
    return "evaluation metrics"


def group_series(
    records: Iterable[Mapping[str, Any]],
) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Panel title → metric name → (steps, values), in panel order, finite numbers only."""
    order = ["loss", "learning rate", "evaluation metrics", "throughput", "memory (MiB)"]
    points: dict[str, dict[int, float]] = {}
    for record in records:
        step = record["step"]
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if _panel(key) is not None and math.isfinite(value):
                points.setdefault(key, {})[step] = float(value)
    panels: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for key, by_step in points.items():
        panel = _panel(key)
        assert panel is not None
        steps = sorted(by_step)
        panels.setdefault(panel, {})[key] = (steps, [by_step[s] for s in steps])
    return {title: panels[title] for title in order if title in panels}


def plot_run(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, dpi: int = 100
) -> Path:
    """Draw the run's metrics; returns the PNG's path (default ``<run_dir>/metrics.png``).

    Raises:
        ConfigError: no metrics log, or nothing in it to draw.
        MissingDependencyError: matplotlib is not installed.
    """
    require("matplotlib", extra="plot", what="treadle plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    source = Path(run_dir)
    panels = group_series(read_metrics(source))
    if not panels:
        raise ConfigError(f"{source}: the metrics log holds no numbers to plot yet")
    directory = source if source.is_dir() else source.parent
    target = Path(out) if out is not None else directory / "metrics.png"

    figure = Figure(figsize=(8, 2.6 * len(panels)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, series) in zip(axes, panels.items()):
        for key, (steps, values) in series.items():
            marker = "o" if len(steps) <= 30 else None  # sparse series (evaluations) as dots
            ax.plot(steps, values, label=key, marker=marker, markersize=3, linewidth=1.2)
        every_value = [v for _, values in series.values() for v in values]
        if title == "learning rate" and every_value and min(every_value) > 0:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("step")
    figure.suptitle(f"{directory.resolve().name}", fontsize=11)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=dpi)
    return target
