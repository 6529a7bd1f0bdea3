"""``treadle plot RUN_DIR [RUN_DIR ...]``: one PNG of runs' metrics against step, from their
``metrics.jsonl``.

Up to five panels, each drawn only when a log has its metrics:

* **loss**: the training ``loss`` and every evaluation loss (``<set>/loss``);
* **learning rate**: ``lr`` and every ``lr/<group>``, on a log scale (a warm-up's zero learning
  rate has no place on it and is left out);
* **evaluation metrics**: every other ``<set>/<metric>`` an evaluation logged;
* **throughput**: ``samples_per_s``, ``tokens_per_s`` and the ``throughput/*`` rates;
* **memory**: the ``memory/*`` figures.

Several runs share the figure: each run has its colour, each metric of a panel its line style,
and the legend says ``run: metric``. A metric logged several times at one step (a resumed run
re-logging steps) is drawn with its last value. Drawing uses matplotlib's object API with the Agg canvas (no display, and no change
to pyplot's global backend); matplotlib is an extra: ``pip install "treadle[plot]"``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from treadle.errors import ConfigError, require

__all__ = ["group_series", "plot_run", "plot_runs", "read_metrics"]

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
    return {title: panels[title] for title in _ORDER if title in panels}


def plot_run(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, dpi: int = 100
) -> Path:
    """Draw one run's metrics; returns the PNG's path (default ``<run_dir>/metrics.png``).

    Raises:
        ConfigError: no metrics log, or nothing in it to draw.
        MissingDependencyError: matplotlib is not installed.
    """
    return plot_runs([run_dir], out, dpi)


_STYLES = ("-", "--", ":", "-.")


def plot_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    dpi: int = 100,
) -> Path:
    """Draw several runs in one figure; returns the PNG's path (default: ``metrics.png`` in
    the one run's directory, ``comparison.png`` in the current directory for several).

    Raises:
        ConfigError: no run, a run without a metrics log, or nothing in them to draw.
        MissingDependencyError: matplotlib is not installed.
    """
    require("matplotlib", extra="plot", what="treadle plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not run_dirs:
        raise ConfigError("treadle plot needs at least one run directory (or metrics.jsonl)")
    sources = [Path(run_dir) for run_dir in run_dirs]
    names = [_run_name(source) for source in sources]
    runs = {name: group_series(read_metrics(source)) for name, source in zip(names, sources)}
    titles = [t for t in _ORDER if any(t in panels for panels in runs.values())]
    if not titles:
        raise ConfigError(f"{', '.join(map(str, sources))}: no metrics to plot yet")
    if out is not None:
        target = Path(out)
    elif len(sources) == 1:
        target = (sources[0] if sources[0].is_dir() else sources[0].parent) / "metrics.png"
    else:
        target = Path("comparison.png")

    figure = Figure(figsize=(8, 2.6 * len(titles)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(titles), 1, sharex=True, squeeze=False)[:, 0]
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, title in zip(axes, titles):
        keys = sorted({key for panels in runs.values() for key in panels.get(title, {})})
        for colour, (name, panels) in zip(colours, runs.items()):
            for key, (steps, values) in panels.get(title, {}).items():
                if title == "learning rate":  # log scale: zeros (warm-up's start) cannot show
                    steps, values = _positive(steps, values)
                label = key if len(runs) == 1 else f"{name}: {key}"
                style = _STYLES[keys.index(key) % len(_STYLES)]
                marker = "o" if len(steps) <= 30 else None  # sparse series (evaluations) as dots
                colour_of = colour if len(runs) > 1 else None
                ax.plot(steps, values, style, color=colour_of, label=label, marker=marker,
                        markersize=3, linewidth=1.2)  # fmt: skip
        if title == "learning rate" and ax.lines:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("step")
    figure.suptitle(" vs ".join(names), fontsize=11)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=dpi)
    return target


_ORDER = ("loss", "learning rate", "evaluation metrics", "throughput", "memory (MiB)")


def _run_name(source: Path) -> str:
    directory = source if source.is_dir() else source.parent
    return directory.resolve().name


def _positive(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    kept = [(step, value) for step, value in zip(steps, values) if value > 0]
    return [s for s, _ in kept], [v for _, v in kept]
