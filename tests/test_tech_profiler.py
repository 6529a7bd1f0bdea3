"""The ``profiler`` technique plugin: a torch.profiler trace of a chosen window of steps."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import toy

import treadle
from treadle.plugins.techniques.profiler import Profiler

pytestmark = pytest.mark.timeout(120)


def _fit(tmp_path: Path, plugin: Any, max_steps: int = 6, **config: Any) -> treadle.Run:
    torch.manual_seed(0)
    run = treadle.Run(
        toy.model(),
        toy.train_data(),
        config=treadle.Config(
            max_steps=max_steps, output_dir=str(tmp_path / "out"), log_every=0, **config
        ),
        optimizer={"name": "sgd", "lr": 0.05},
        loggers=[],
        checkpoint=None,
        plugins=[plugin],
    )
    run.fit()
    return run


def _traces(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "out" / "profiler").glob("*.pt.trace.json"))


def _step_labels(trace: Path) -> tuple[set[int], set[int], set[str]]:
    """(treadle/step numbers, ProfilerStep numbers, every event name) in a Chrome trace."""
    document = json.loads(trace.read_text())
    assert isinstance(document.get("traceEvents"), list) and document["traceEvents"]
    names = {str(event.get("name", "")) for event in document["traceEvents"]}
    ours = {int(m.group(1)) for n in names if (m := re.fullmatch(r"treadle/step (\d+)", n))}
    torchs = {int(m.group(1)) for n in names if (m := re.fullmatch(r"ProfilerStep#(\d+)", n))}
    return ours, torchs, names


def test_schedule_window_is_traced_and_nothing_outside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin = Profiler(wait=1, warmup=1, active=2, repeat=1)
    _fit(tmp_path, plugin, max_steps=6)
    traces = _traces(tmp_path)
    assert len(traces) == 1 and traces[0].name.startswith("rank0.")
    assert plugin.traces == traces
    ours, torchs, names = _step_labels(traces[0])
    assert ours == {2, 3}  # wait step 0, warm-up step 1, recorded 2 and 3; 4, 5 idle
    assert torchs == {2, 3}
    assert any(name.startswith("aten::") for name in names)  # the model's operators
    assert "aten::addmm" in names or "aten::linear" in names
    err = capsys.readouterr().err
    assert str(traces[0]) in err  # one line names the file
    assert "Self CPU" not in err  # no table unless asked


def test_absolute_window_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugin = Profiler(start_step=3, steps=2, table_rows=5, record_shapes=True)
    _fit(tmp_path, plugin, max_steps=8)
    (trace,) = _traces(tmp_path)
    ours, _, _ = _step_labels(trace)
    assert ours == {3, 4}
    err = capsys.readouterr().err
    assert "top operators by self time" in err and "Self CPU" in err


def test_repeat_writes_one_trace_per_cycle(tmp_path: Path) -> None:
    plugin = Profiler(wait=0, warmup=1, active=1, repeat=2)
    _fit(tmp_path, plugin, max_steps=6)
    traces = _traces(tmp_path)
    assert len(traces) == 2
    assert sorted(_step_labels(t)[0].pop() for t in traces) == [1, 3]


def test_window_cut_short_by_the_end_of_fit_is_still_written(tmp_path: Path) -> None:
    plugin = Profiler(start_step=4, steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", treadle.TreadleWarning)
        _fit(tmp_path, plugin, max_steps=6)
    (trace,) = _traces(tmp_path)
    assert _step_labels(trace)[0] == {4, 5}


def test_trace_is_written_when_the_fit_fails(tmp_path: Path) -> None:
    class Boom:
        @treadle.hookimpl
        def on_micro_step_begin(self, run: treadle.Run) -> None:
            if run.state.step == 3:  # inside step 3
                raise RuntimeError("boom")

    torch.manual_seed(0)
    plugin = Profiler(start_step=1, steps=5)
    run = treadle.Run(
        toy.model(),
        toy.train_data(),
        config=treadle.Config(max_steps=8, output_dir=str(tmp_path / "out"), log_every=0),
        loggers=[],
        checkpoint=None,
        plugins=[Boom(), plugin],
    )
    with pytest.raises(Exception, match="boom"):
        run.fit()
    (trace,) = _traces(tmp_path)
    assert _step_labels(trace)[0] == {1, 2, 3}  # the failing step's start is in the trace
    assert plugin._profiler is None  # stopped: a later fit starts a fresh one


def test_window_after_the_last_step_warns(tmp_path: Path) -> None:
    with pytest.warns(
        treadle.TreadleWarning, match=r"start_step=10.*starts at step 10.*ends at step 4"
    ):
        _fit(tmp_path, Profiler(start_step=10, steps=2), max_steps=4)
    assert _traces(tmp_path) == []
    with pytest.warns(treadle.TreadleWarning, match=r"wait=5"):
        _fit(tmp_path, Profiler(wait=5, warmup=1, active=1), max_steps=4)


def test_by_name_with_options(tmp_path: Path) -> None:
    _fit(tmp_path, {"name": "profiler", "wait": 0, "warmup": 1, "active": 1}, max_steps=3)
    assert len(_traces(tmp_path)) == 1


@pytest.mark.parametrize("all_ranks", [True, False])
def test_a_rank_other_than_the_main_one(tmp_path: Path, all_ranks: bool) -> None:
    class SecondRank(treadle.Strategy):
        name = "second-rank"
        rank = 1  # seen from a non-main process of a (pretend) two-process run

    (tmp_path / "out").mkdir()
    torch.manual_seed(0)
    run = treadle.Run(
        toy.model(),
        toy.train_data(),
        config=treadle.Config(max_steps=2, output_dir=str(tmp_path / "out"), log_every=0),
        strategy=SecondRank(),
        loggers=[],
        checkpoint=None,
        plugins=[Profiler(all_ranks=all_ranks, wait=0, warmup=1, active=1)],
    )
    run.fit()
    names = [t.name.split(".")[0] for t in _traces(tmp_path)]
    assert names == (["rank1"] if all_ranks else [])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"wait": -1}, "wait = -1"),
        ({"active": 0}, "active = 0"),
        ({"repeat": 1.5}, "repeat = 1.5"),
        ({"steps": 3}, "needs start_step"),
        ({"start_step": 2, "active": 3}, "cannot be combined with active"),
        ({"start_step": -1}, "start_step = -1"),
        ({"start_step": 0, "steps": 0}, "steps = 0"),
        ({"activities": ["tpu"]}, "activities"),
        ({"activities": "cpu"}, "activities"),
        ({"record_shapes": 1}, "record_shapes"),
        ({"table_rows": -2}, "table_rows"),
        ({"all_ranks": "yes"}, "all_ranks"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], match: str) -> None:
    with pytest.raises(treadle.ConfigError, match=match):
        Profiler(**options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_activity_without_cuda_is_refused(tmp_path: Path) -> None:
    with pytest.raises(treadle.ConfigError, match="CUDA is not available"):
        _fit(tmp_path, Profiler(activities=["cpu", "cuda"]), max_steps=2)
