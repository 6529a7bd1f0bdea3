"""``treadle search`` (the installed ``treadle.command`` entry point): two workers share one
SQLite study, and the best run file, run with ``treadle run``, reproduces the best trial."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import MAX_STEPS, finish, treadle_cli
from treadle_optuna import runfile

from treadle import registry


def test_search_is_a_treadle_command() -> None:
    declared = registry.entries("command")["search"]
    assert [entry.distribution for entry in declared] == ["treadle-optuna"]


def _last_eval_loss(metrics_file: Path) -> float:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return [r["eval/loss"] for r in records if "eval/loss" in r][-1]


@pytest.mark.timeout(180)
def test_two_workers_share_a_sqlite_study_and_the_best_run_file_reproduces_the_best_trial(
    tmp_path: Path, run_files: tuple[Path, Path]
) -> None:
    run_file, space_file = run_files
    database = tmp_path / "study.db"
    out = tmp_path / "search"
    budget, workers = 6, 2
    arguments = [
        "search", run_file, "--space", space_file, "--trials", str(budget // workers),
        "--storage", f"sqlite:///{database}", "--study-name", "shared", "--output-dir", out,
        "--seed", "0",
    ]  # fmt: skip
    processes = [treadle_cli(*arguments, cwd=tmp_path) for _ in range(workers)]
    outputs = [finish(p) for p in processes]
    assert all("best run file:" in output for output in outputs), outputs

    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{database}")
    numbers = sorted(t.number for t in study.trials)
    assert numbers == list(range(budget))  # the budget between them, no number twice
    assert all(t.state.is_finished() for t in study.trials)
    workers_seen = [t.user_attrs["worker"] for t in study.trials]
    assert sorted(workers_seen.count(w) for w in set(workers_seen)) == [3, 3]
    for trial in study.trials:
        directory = out / f"trial-{trial.number:04d}"
        # each trial ran its own run file, the sampled lr written into it
        trial_spec = runfile.read(directory / "run.toml")
        assert trial_spec["optimizer"]["lr"] == trial.params["optimizer.lr"]
        assert trial_spec["config"]["output_dir"] == str(directory)
        assert (directory / "metrics.jsonl").is_file()

    best = study.best_trial
    summary = json.loads((out / "best.json").read_text())
    assert (summary["trial"], summary["value"]) == (best.number, best.value)
    best_spec = runfile.read(out / "best.toml")
    assert best_spec["optimizer"] == {"name": "sgd", "lr": best.params["optimizer.lr"]}
    assert best_spec["config"]["max_steps"] == MAX_STEPS
    # the trial's own metrics file holds the value the study recorded
    assert _last_eval_loss(out / f"trial-{best.number:04d}" / "metrics.jsonl") == best.value

    # `treadle run best.toml`, as is: same seed, same data, same lr -> the same eval loss
    finish(treadle_cli("run", out / "best.toml", cwd=tmp_path))
    assert _last_eval_loss(out / "best" / "metrics.jsonl") == best.value


@pytest.mark.timeout(120)
def test_cli_set_overrides_every_trial_and_reports_when_nothing_completed(
    tmp_path: Path, run_files: tuple[Path, Path]
) -> None:
    run_file, space_file = run_files
    process = treadle_cli(
        "search", run_file, "--space", space_file, "--trials", "1", "--output-dir", "out",
        "--set", "max_steps=3", "--set", "optimizer.momentum=0.5", "--metric", "eval/missing",
        cwd=tmp_path,
    )  # fmt: skip
    output, _ = process.communicate(timeout=100)
    assert process.returncode != 0
    assert "never logged 'eval/missing'" in output
    trial = runfile.read(tmp_path / "out" / "trial-0000" / "run.toml")
    assert trial["config"]["max_steps"] == 3
    assert trial["optimizer"]["momentum"] == 0.5  # a dotted key, as treadle run reads it
