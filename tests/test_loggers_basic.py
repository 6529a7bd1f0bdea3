"""The ``console`` and ``jsonl`` loggers, driven through their hook implementations.

A small fake run (a ``SimpleNamespace`` with the attributes loggers read) stands in for
``treadle.Run`` in the unit tests; the end-to-end tests at the bottom use a real run.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import treadle
from treadle.errors import ConfigError
from treadle.plugins.loggers.console import ConsoleLogger, format_metrics
from treadle.plugins.loggers.jsonl import JsonlLogger, to_json_value


def fake_run(
    tmp_path: Path, *, total_steps: int | None = 10, step: int = 0, main: bool = True
) -> Any:
    state = SimpleNamespace(step=step, epoch=0, stop_reason=None, last_metrics={})
    return SimpleNamespace(
        state=state,
        config=SimpleNamespace(output_dir=str(tmp_path), max_steps=total_steps, log_every=2),
        output_dir=tmp_path,
        total_steps=total_steps,
        is_main_process=main,
        hparams=lambda: {"max_steps": total_steps, "lr": 1e-3, "optimizer": "adamw"},
        eval_length=lambda name: 3,
        request_stop=lambda reason: None,
        model=torch.nn.Linear(3, 2),
        resumed_from=None,
    )


def train_steps(logger: Any, run: Any, n: int) -> None:
    """Take ``n`` steps the way the loop reports them: state first, then on_step_end."""
    for _ in range(n):
        run.state.step += 1
        logger.on_step_end(run=run)


# ---------------------------------------------------------------- jsonl


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_lines_parse_back_equal(tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    logger = JsonlLogger()
    logged = [
        {"step": 2, "epoch": 0, "loss": 0.75, "lr": 1e-3, "samples_per_s": 1234.5},
        {"step": 4, "epoch": 0, "loss": 0.5, "lr": 9e-4},
        {"step": 4, "epoch": 0, "eval/loss": 0.625},
        {"step": 6, "epoch": 1.5, "loss": 0.25},
    ]
    logger.on_fit_begin(run=run)
    for metrics in logged:
        logger.on_log(run=run, metrics=metrics)
        # flushed line by line: readable before the logger is closed
        assert len(read_jsonl(tmp_path / "metrics.jsonl")) == logged.index(metrics) + 1
    logger.on_fit_end(run=run)

    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(records) == len(logged)
    for record, metrics in zip(records, logged, strict=True):
        assert isinstance(record["step"], int)
        assert isinstance(record.pop("time"), float)
        assert record == metrics
    # keys keep their order: step, epoch, time, then the metrics
    assert list(json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])) == [
        "step", "epoch", "time", "loss", "lr", "samples_per_s",
    ]  # fmt: skip


def test_jsonl_writes_hparams(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "nested" / "out")
    run.output_dir = tmp_path / "nested" / "out"
    logger = JsonlLogger()
    logger.on_fit_begin(run=run)
    logger.on_fit_end(run=run)
    hparams = json.loads((run.output_dir / "hparams.json").read_text())
    assert hparams == {"max_steps": 10, "lr": 1e-3, "optimizer": "adamw"}
    assert not list(run.output_dir.glob("*.tmp"))  # written through a temporary file


def test_jsonl_non_finite_become_null_and_file_stays_valid_json(tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    logger = JsonlLogger()
    logger.on_log(
        run=run, metrics={"step": 1, "epoch": 0, "loss": math.nan, "a": math.inf, "b": -math.inf}
    )
    logger.on_fit_end(run=run)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert record["loss"] is None and record["a"] is None and record["b"] is None


def test_to_json_value_converts_scalars_and_containers() -> None:
    import torch

    assert to_json_value(torch.tensor(2.5)) == 2.5
    assert to_json_value(torch.tensor(float("nan"))) is None
    assert to_json_value({"x": (1, math.inf)}) == {"x": [1, None]}
    assert to_json_value(Path("a")) == "a"


def test_jsonl_path_option_and_append(tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    for step in (1, 2):  # two fits in a row append to the same file
        logger = JsonlLogger(path="logs/train.jsonl")
        logger.on_fit_begin(run=run)
        logger.on_log(run=run, metrics={"step": step, "epoch": 0, "loss": 1.0 / step})
        logger.on_fit_end(run=run)
    records = read_jsonl(tmp_path / "logs" / "train.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    absolute = tmp_path / "elsewhere.jsonl"
    logger = JsonlLogger(path=absolute)
    logger.on_log(run=run, metrics={"step": 3, "epoch": 0})
    logger.on_fit_end(run=run)
    assert read_jsonl(absolute)[0]["step"] == 3


def test_jsonl_resume_drops_lines_after_the_checkpoint_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "epoch": 0, "loss": 1.0}) for s in (2, 4, 6, 8)]
    path.write_text("\n".join(lines) + '\n{"step": 10, "ep')  # crashed mid-line
    run = fake_run(tmp_path, step=4)  # resumed from the checkpoint at step 4
    logger = JsonlLogger()
    logger.on_fit_begin(run=run)
    logger.on_log(run=run, metrics={"step": 6, "epoch": 0, "loss": 0.5})
    logger.on_fit_end(run=run)
    assert [r["step"] for r in read_jsonl(path)] == [2, 4, 6]

    kept = JsonlLogger(rewind_on_resume=False)
    run.state.step = 2
    kept.on_fit_begin(run=run)
    kept.on_fit_end(run=run)
    assert [r["step"] for r in read_jsonl(path)] == [2, 4, 6]


def test_jsonl_never_glues_onto_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    run = fake_run(tmp_path)  # step 0: not a resume, so nothing is dropped
    logger = JsonlLogger()
    logger.on_log(run=run, metrics={"step": 3, "epoch": 0})
    logger.on_fit_end(run=run)
    last = path.read_text().splitlines()[-1]
    assert json.loads(last)["step"] == 3


def test_jsonl_writes_only_on_main_process(tmp_path: Path) -> None:
    run = fake_run(tmp_path, main=False)
    logger = JsonlLogger()
    logger.on_fit_begin(run=run)
    logger.on_log(run=run, metrics={"step": 1, "epoch": 0, "loss": 1.0})
    logger.on_fit_end(run=run)
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "hparams.json").exists()


@pytest.mark.parametrize("options", [{"path": 3}, {"path": ""}, {"rewind_on_resume": "yes"}])
def test_jsonl_invalid_options(options: dict[str, Any]) -> None:
    name = next(iter(options))
    with pytest.raises(ConfigError, match=name):
        JsonlLogger(**options)


# ---------------------------------------------------------------- console


def test_console_plain_lines_when_not_a_tty(tmp_path: Path) -> None:
    out = io.StringIO()  # isatty() is False: plain lines
    run = fake_run(tmp_path)
    logger = ConsoleLogger(file=out)
    logger.on_fit_begin(run=run)
    train_steps(logger, run, 2)
    logger.on_log(
        run=run,
        metrics={"step": 2, "epoch": 0, "loss": 0.123456, "lr": 1e-3, "samples_per_s": 512.0},
    )
    train_steps(logger, run, 2)
    logger.on_log(run=run, metrics={"step": 4, "epoch": 0, "eval/loss": 0.25})
    logger.on_fit_end(run=run)
    lines = out.getvalue().splitlines()
    assert lines[0] == "treadle: training Linear with 8 parameters (8 trainable)"
    assert lines[1] == "[step 2/10, epoch 0] loss=0.1235 lr=1.000e-03 samples_per_s=512.0"
    assert lines[2] == "[step 4/10, epoch 0] eval/loss=0.25"
    assert lines[3].startswith("treadle: 4 steps in ")
    assert lines[3].endswith("(at step 4), final loss 0.1235")
    assert "\r" not in out.getvalue()  # no bar redraws in a CI log
    assert len(lines) == 4


def test_console_names_the_checkpoint_a_run_resumed_from_once(tmp_path: Path) -> None:
    out = io.StringIO()
    run = fake_run(tmp_path, step=6)
    run.model.bias.requires_grad_(False)
    run.resumed_from = tmp_path / "checkpoints" / "step-000006"
    logger = ConsoleLogger(file=out)
    logger.on_fit_begin(run=run)
    logger.on_fit_begin(run=run)  # a second fit() of the same run goes on from where it is
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        f"treadle: training Linear with 8 parameters (6 trainable); resumed from step 6 of "
        f"{tmp_path / 'checkpoints' / 'step-000006'}"
    )
    assert lines[1] == "treadle: training Linear with 8 parameters (6 trainable)"


def test_console_uses_stderr_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path)
    logger = ConsoleLogger()
    logger.on_log(run=run, metrics={"step": 1, "epoch": 0, "loss": 2.0})
    captured = capsys.readouterr()
    assert "loss=2" in captured.err and captured.out == ""


def test_console_bar_advances_to_total(tmp_path: Path) -> None:
    out = io.StringIO()
    run = fake_run(tmp_path, total_steps=10)
    logger = ConsoleLogger(file=out, bar=True, refresh_s=3600)  # never redraws on its own
    logger.on_fit_begin(run=run)
    bar = logger._train_bar
    train_steps(logger, run, 4)
    assert bar.n == 0  # throttled: counted, not drawn
    logger.on_log(
        run=run, metrics={"step": 4, "epoch": 0, "loss": 0.5, "lr": 0.01, "samples_per_s": 99.0}
    )
    assert bar.n == 4  # a log brings the bar up to date
    assert "loss=0.5" in out.getvalue() and "lr=1.000e-02" in out.getvalue()
    train_steps(logger, run, 6)
    logger.on_fit_end(run=run)
    assert bar.n == bar.total == 10
    assert "10/10" in out.getvalue()
    assert out.getvalue().rstrip().splitlines()[-1].startswith("treadle: 10 steps in ")


def test_console_bar_redraws_when_refresh_due(tmp_path: Path) -> None:
    out = io.StringIO()
    run = fake_run(tmp_path, total_steps=5)
    logger = ConsoleLogger(file=out, bar=True, refresh_s=0)
    logger.on_fit_begin(run=run)
    train_steps(logger, run, 3)
    assert logger._train_bar.n == 3  # refresh_s=0: every step is drawn
    logger.on_fit_end(run=run)


def test_console_bar_counts_absolute_steps_on_resume(tmp_path: Path) -> None:
    out = io.StringIO()
    run = fake_run(tmp_path, total_steps=10, step=4)  # resumed at 4; ends at step 10
    logger = ConsoleLogger(file=out, bar=True)
    logger.on_fit_begin(run=run)
    bar = logger._train_bar
    train_steps(logger, run, 6)
    logger.on_fit_end(run=run)
    assert (bar.n, bar.total) == (10, 10)
    assert "treadle: 6 steps in " in out.getvalue()


def test_console_eval_bar_is_nested_and_removed(tmp_path: Path) -> None:
    out = io.StringIO()
    run = fake_run(tmp_path)
    logger = ConsoleLogger(file=out, bar=True, refresh_s=0)
    logger.on_fit_begin(run=run)
    train_steps(logger, run, 2)
    logger.on_eval_begin(run=run, name="val")
    eval_bar = logger._eval_bar
    assert eval_bar.total == 3 and eval_bar.leave is False and eval_bar.desc.startswith("val")
    for _ in range(3):
        logger.on_eval_step_end(run=run)
    assert eval_bar.n == 3
    logger.on_eval_end(run=run)
    assert logger._eval_bar is None
    logger.on_log(run=run, metrics={"step": 2, "epoch": 0, "val/loss": 0.5})
    logger.on_fit_end(run=run)
    assert "val/loss=0.5" in out.getvalue()  # eval results are printed, not only a postfix


def test_console_disable_prints_nothing(tmp_path: Path) -> None:
    out = io.StringIO()
    run = fake_run(tmp_path)
    logger = ConsoleLogger(file=out, disable=True, bar=True)
    logger.on_fit_begin(run=run)
    train_steps(logger, run, 3)
    logger.on_eval_begin(run=run, name="eval")
    logger.on_log(run=run, metrics={"step": 3, "epoch": 0, "loss": 1.0})
    logger.on_fit_end(run=run)
    assert out.getvalue() == ""


def test_console_silent_off_main_process(tmp_path: Path) -> None:
    out = io.StringIO()
    run = fake_run(tmp_path, main=False)
    logger = ConsoleLogger(file=out, bar=True)
    logger.on_fit_begin(run=run)
    train_steps(logger, run, 3)
    logger.on_log(run=run, metrics={"step": 3, "epoch": 0, "loss": 1.0})
    logger.on_fit_end(run=run)
    assert out.getvalue() == ""


def test_console_summary_names_a_failure(tmp_path: Path) -> None:
    out = io.StringIO()
    run = fake_run(tmp_path)
    logger = ConsoleLogger(file=out)
    logger.on_fit_begin(run=run)
    train_steps(logger, run, 1)
    logger.on_exception(run=run, exception=RuntimeError("boom"))
    assert "failed: RuntimeError: boom" in out.getvalue()


def test_format_metrics_orders_loss_and_lr_first() -> None:
    text = format_metrics({"step": 3, "epoch": 0, "grad_norm": 1.5, "lr": 3e-4, "loss": math.nan})
    assert text == "loss=nan lr=3.000e-04 grad_norm=1.5"


@pytest.mark.parametrize(
    "options",
    [{"refresh_s": -1}, {"refresh_s": "fast"}, {"disable": 1}, {"bar": "auto"}, {"file": 3}],
)
def test_console_invalid_options(options: dict[str, Any]) -> None:
    name = next(iter(options))
    with pytest.raises(ConfigError, match=name):
        ConsoleLogger(**options)


def test_import_treadle_does_not_import_these_plugins() -> None:
    import subprocess

    code = (
        "import sys, treadle; "
        "bad = [m for m in sys.modules if m.startswith(('treadle.plugins.loggers', "
        "'treadle.plugins.callbacks'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_console_module_imports_tqdm_lazily(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch itself imports tqdm, so "not in sys.modules" proves nothing: make it unimportable
    # and check the module loads and the plain-line mode works without it.
    import importlib

    for name in [m for m in sys.modules if m == "tqdm" or m.startswith("tqdm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.delitem(sys.modules, "treadle.plugins.loggers.console")
    module = importlib.import_module("treadle.plugins.loggers.console")
    out = io.StringIO()
    logger = module.ConsoleLogger(file=out)
    logger.on_log(run=fake_run(tmp_path), metrics={"step": 1, "epoch": 0, "loss": 1.0})
    assert "loss=1" in out.getvalue()


# ---------------------------------------------------------------- end to end, with a real run


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.linear(x), y)}


def regression_batches(n: int = 10) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        x = torch.randn(4, 3, generator=generator)
        batches.append({"x": x, "y": x.sum(dim=1, keepdim=True)})
    return batches


def test_end_to_end_console_and_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    run = treadle.Run(
        model=Regression(),
        train_data=regression_batches(),
        config=treadle.Config(max_steps=10, log_every=2, output_dir=str(tmp_path)),
        loggers=["console", "jsonl"],
        checkpoint=None,
    )
    run.fit()

    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    for record in records:
        assert {"epoch", "time", "loss", "lr", "samples_per_s", "step_time_s"} <= set(record)
        assert math.isfinite(record["loss"])
    hparams = json.loads((tmp_path / "hparams.json").read_text())
    assert hparams["max_steps"] == 10 and hparams["log_every"] == 2

    err = capsys.readouterr().err  # captured stderr is not a terminal: plain lines
    lines = err.splitlines()
    assert [line.split("]")[0] for line in lines if "loss=" in line and line.startswith("[")] == [
        f"[step {s}/10, epoch 0" for s in (2, 4, 6, 8, 10)
    ]
    assert lines[-1].startswith("treadle: 10 steps in ")
    assert f"final loss {records[-1]['loss']:.4g}" in lines[-1]

    # a second fit continues the same file and the console counts this fit's steps
    run.fit(max_steps=14)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [2, 4, 6, 8, 10, 12, 14]
    assert capsys.readouterr().err.splitlines()[-1].startswith("treadle: 4 steps in ")


def test_end_to_end_console_bar_with_eval(tmp_path: Path) -> None:
    out = io.StringIO()
    console = ConsoleLogger(file=out, bar=True)
    run = treadle.Run(
        model=Regression(),
        train_data=regression_batches(),
        eval_data=regression_batches(3),
        config=treadle.Config(max_steps=10, log_every=2, eval_every=5, output_dir=str(tmp_path)),
        loggers=[console],
        checkpoint=None,
    )
    run.fit()
    text = out.getvalue()
    assert "10/10" in text
    assert text.count("eval/loss=") == 2  # evaluations at steps 5 and 10, printed above the bar
    assert text.rstrip().splitlines()[-1].startswith("treadle: 10 steps in ")


def test_end_to_end_jsonl_resume_logs_each_step_once(tmp_path: Path) -> None:
    def make(**config: Any) -> treadle.Run:
        torch.manual_seed(0)
        return treadle.Run(
            model=Regression(),
            train_data=regression_batches(),
            config=treadle.Config(log_every=2, output_dir=str(tmp_path), **config),
            loggers=["jsonl"],
            checkpoint="safetensors",
        )

    # "crashes" after step 8 with its last checkpoint at step 6: steps 7-8 will be redone
    make(max_steps=8, save_every=6, save_at_end=False).fit()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [2, 4, 6, 8]
    resumed = make(max_steps=10, resume="auto")
    resumed.fit()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
