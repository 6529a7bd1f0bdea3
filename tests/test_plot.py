"""``treadle plot RUN_DIR [RUN_DIR ...]``: a PNG of runs' metrics from their metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import toy

import treadle
from treadle.cli import main
from treadle.errors import MissingDependencyError
from treadle.plugins.callbacks.lr_monitor import LearningRateMonitor
from treadle.plugins.callbacks.throughput import Throughput
from treadle.plugins.loggers.jsonl import JsonlLogger
from treadle.plugins.metrics import Metrics
from treadle.plugins.plot import group_series, plot_run, read_metrics


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """The output of a small run with training, evaluation and throughput metrics."""
    torch.manual_seed(0)
    out = tmp_path / "run"
    treadle.Run(
        toy.model(),
        toy.train_data(n=64, batch_size=8),
        eval_data=toy.train_data(n=16, batch_size=8, seed=2),
        config=treadle.Config(max_steps=12, log_every=2, eval_every=4, output_dir=str(out)),
        loggers=[JsonlLogger()],
        checkpoint=None,
        plugins=[Metrics({"mae": "mae"}), Throughput(), LearningRateMonitor()],
    ).fit()
    return out


def _decoded(path: Path) -> tuple[int, int]:
    image = pytest.importorskip("matplotlib.image")
    pixels = image.imread(path)  # decodes the PNG, or raises
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    return pixels.shape[1], pixels.shape[0]


def test_plot_command_writes_a_png_and_prints_its_path(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (treadle[plot])")
    assert main(["plot", str(run_dir)]) == 0
    printed = capsys.readouterr().out.strip()
    png = run_dir / "metrics.png"
    assert printed == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    width, height = _decoded(png)
    assert width == 800 and height == 4 * 260  # four panels: loss, lr, eval, throughput


def test_plot_as_a_process_with_an_output_path(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (treadle[plot])")
    target = tmp_path / "pictures" / "run.png"
    result = subprocess.run(
        [sys.executable, "-m", "treadle", "plot", str(run_dir / "metrics.jsonl"), "-o", str(target)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(target)
    _decoded(target)


def test_panels_group_the_metrics(run_dir: Path) -> None:
    panels = group_series(read_metrics(run_dir))
    assert list(panels) == ["loss", "learning rate", "evaluation metrics", "throughput"]
    assert set(panels["loss"]) == {"loss", "eval/loss"}
    assert set(panels["learning rate"]) == {"lr", "lr/group0", "lr/group1"}
    assert set(panels["evaluation metrics"]) == {"eval/mae"}
    assert set(panels["throughput"]) == {"samples_per_s", "throughput/samples_per_s"}
    steps, values = panels["loss"]["eval/loss"]
    assert steps == [4, 8, 12] and len(values) == 3


def test_repeated_steps_keep_the_last_value_and_torn_lines_are_skipped(tmp_path: Path) -> None:
    lines = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0},
        {"step": 2, "loss": 1.5},  # a resumed run logged step 2 again
        {"step": 3, "loss": None},  # a non-finite value, written as null
    ]
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"step": 4, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert group_series(read_metrics(tmp_path)) == {"loss": {"loss": ([1, 2], [3.0, 1.5])}}


def test_errors_name_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["plot", str(tmp_path)]) == 2  # no metrics.jsonl: a clear error, exit code 2
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "treadle\[plot\]"'):
        plot_run(tmp_path)


def test_missing_log_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["plot", str(tmp_path)])
    assert "no metrics log at" in capsys.readouterr().err


def _captured_figure(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    figure_module = pytest.importorskip("matplotlib.figure")
    figures: list[object] = []
    original = figure_module.Figure.savefig

    def keep(self: object, *args: object, **kwargs: object) -> None:
        figures.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(figure_module.Figure, "savefig", keep)
    return figures


def _warmup_run(out: Path, lr: float) -> Path:
    torch.manual_seed(0)
    treadle.Run(
        toy.model(),
        toy.train_data(n=64, batch_size=8),
        config=treadle.Config(max_steps=8, log_every=1, output_dir=str(out)),
        optimizer={"name": "adamw", "lr": lr},
        scheduler={"name": "linear", "warmup_steps": 4},
        loggers=[JsonlLogger()],
        checkpoint=None,
    ).fit()
    return out


def test_several_runs_in_one_figure_and_lr_on_a_log_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = _captured_figure(monkeypatch)
    first, second = _warmup_run(tmp_path / "small", 1e-3), _warmup_run(tmp_path / "big", 1e-1)
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(first), str(second)]) == 0
    assert capsys.readouterr().out.strip() == "comparison.png"
    _decoded(tmp_path / "comparison.png")
    (figure,) = figures
    panels = {ax.get_title(loc="left"): ax for ax in figure.axes}  # type: ignore[attr-defined]
    labels = {line.get_label() for line in panels["loss"].lines}
    assert labels == {"small: loss", "big: loss"}
    colours = {line.get_label(): line.get_color() for line in panels["loss"].lines}
    assert colours["small: loss"] != colours["big: loss"]
    lr = panels["learning rate"]
    assert lr.get_yscale() == "log"
    for line in lr.lines:  # a warm-up's zero cannot sit on a log scale: left out, not fatal
        assert min(line.get_ydata()) > 0


def test_a_warm_up_from_zero_keeps_the_log_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = _captured_figure(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    records = [{"step": s, "lr": s * 1e-4, "loss": 1.0 / (s + 1)} for s in range(5)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_run(out)
    (figure,) = figures
    lr = next(ax for ax in figure.axes if ax.get_title(loc="left") == "learning rate")  # type: ignore[attr-defined]
    assert lr.get_yscale() == "log"
    assert list(lr.lines[0].get_xdata()) == [1, 2, 3, 4]
