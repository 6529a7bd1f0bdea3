"""search() in Python: it finds the learning rate a grid finds, prunes bad trials at a step
boundary, and keeps each trial in its own directory."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import treadle_optuna
from conftest import EVAL_EVERY, MAX_STEPS, toy_run
from treadle_optuna import runfile

import treadle

GRID = [10 ** (-4 + i / 4) for i in range(17)]  # the search range, 4 points per decade


def _final_eval_loss(lr: float, output_dir: Path) -> float:
    with toy_run(lr, output_dir) as run:
        state = run.fit(save_at_end=False)
    return state.last_metrics["eval/loss"]


@pytest.mark.timeout(120)
def test_search_of_12_trials_finds_the_grid_best_learning_rate(tmp_path: Path) -> None:
    # The grid first: the best lr of the range (0.178 on this problem; the loss falls steadily
    # up to it and the run diverges from about 0.26 on).
    losses = {lr: _final_eval_loss(lr, tmp_path / f"grid-{i}") for i, lr in enumerate(GRID)}
    finite = {lr: loss for lr, loss in losses.items() if math.isfinite(loss)}
    grid_best = min(finite, key=finite.__getitem__)
    assert 0.1 < grid_best < 0.26, losses

    def build_run(trial: optuna.Trial) -> treadle.Run:
        lr = trial.suggest_float("optimizer.lr", 1e-4, 1.0, log=True)
        return toy_run(lr, treadle_optuna.trial_dir(trial))

    result = treadle_optuna.search(
        build_run,
        n_trials=12,
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5),
        pruner="median",
        output_dir=tmp_path / "search",
    )
    assert len(result.study.trials) == 12
    found = result.best_params["optimizer.lr"]
    # The stated range: within a factor 2 below the grid's best and under the divergence edge.
    assert grid_best / 2 <= found <= 0.25, (found, grid_best)
    # and as good a loss as the grid's best, within 50 %
    assert result.best_value <= 1.5 * finite[grid_best], (result.best_value, finite[grid_best])
    # no run file to start from: only the summary
    assert result.best_run_file is None
    assert (tmp_path / "search" / "best.json").is_file()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad_lr", [1e-5, 30.0], ids=["tiny", "huge"])
def test_a_bad_learning_rate_is_pruned_at_its_first_evaluation(tmp_path: Path, bad_lr) -> None:
    # three good trials give the median pruner its reference; the fourth is bad
    learning_rates = [0.1, 0.15, 0.05, bad_lr]

    def build_run(trial: optuna.Trial) -> treadle.Run:
        return toy_run(learning_rates[trial.number], treadle_optuna.trial_dir(trial))

    result = treadle_optuna.search(
        build_run,
        n_trials=4,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3),
        output_dir=tmp_path,
    )
    trials = result.study.trials
    states = [t.state for t in trials]
    complete, pruned = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    assert states == [complete, complete, complete, pruned]
    bad = trials[3]
    # stopped at the step boundary of its first evaluation, far from max_steps
    assert bad.user_attrs["steps"] == EVAL_EVERY < MAX_STEPS
    assert list(bad.intermediate_values) == [EVAL_EVERY]
    assert "pruned by Optuna" in bad.user_attrs["stop_reason"]
    # good trials ran to the end, each evaluation reported
    for good in trials[:3]:
        assert good.user_attrs["steps"] == MAX_STEPS
        assert list(good.intermediate_values) == list(range(EVAL_EVERY, MAX_STEPS + 1, EVAL_EVERY))
    # each trial wrote to its own directory, the pruned one included (its final checkpoint)
    for trial in trials:
        directory = tmp_path / f"trial-{trial.number:04d}"
        assert treadle_optuna.trial_dir(trial) == directory
        assert (directory / "checkpoints").is_dir(), sorted(p.name for p in directory.iterdir())


@pytest.mark.timeout(60)
def test_declarative_space_is_sampled_before_build_run_and_written_into_the_run_file(
    tmp_path: Path,
) -> None:
    seen = []

    def build_run(trial: optuna.Trial) -> treadle.Run:
        options = treadle_optuna.params(trial, "optimizer")  # sampled from the space already
        seen.append(options)
        return toy_run(options["lr"], tmp_path / "elsewhere" / str(trial.number))

    base = {"model": "optuna_toy:model", "train_data": "optuna_toy:train_data",
            "optimizer": "sgd", "config": {"max_steps": MAX_STEPS}}  # fmt: skip
    result = treadle_optuna.search(
        build_run,
        {"optimizer.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
        n_trials=2,
        seed=0,
        output_dir=tmp_path / "search",
        run_file=base,
    )
    assert [set(s) for s in seen] == [{"lr"}, {"lr"}]
    # the run's own output_dir is replaced by the trial's
    assert (tmp_path / "search" / "trial-0000" / "checkpoints").is_dir()
    assert not (tmp_path / "elsewhere").exists()
    best = runfile.read(result.best_run_file)
    assert best["optimizer"] == {"name": "sgd", "lr": result.best_params["optimizer.lr"]}
    assert best["config"] == {
        "max_steps": MAX_STEPS,
        "output_dir": str(tmp_path / "search" / "best"),
    }


def test_a_stored_study_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(treadle.ConfigError, match="study_name"):
        treadle_optuna.search(
            lambda trial: None, n_trials=1, storage=f"sqlite:///{tmp_path / 's.db'}"
        )


@pytest.mark.timeout(60)
def test_a_metric_never_logged_fails_the_search_by_name(tmp_path: Path) -> None:
    def build_run(trial: optuna.Trial) -> treadle.Run:
        return toy_run(0.1, treadle_optuna.trial_dir(trial))

    with pytest.raises(treadle.ConfigError, match="never logged 'eval/accuracy'"):
        treadle_optuna.search(build_run, n_trials=1, metric="eval/accuracy", output_dir=tmp_path)


@pytest.mark.timeout(60)
def test_a_trial_directory_left_by_another_search_is_refused(tmp_path: Path) -> None:
    def build_run(trial: optuna.Trial) -> treadle.Run:
        return toy_run(0.1, treadle_optuna.trial_dir(trial))

    treadle_optuna.search(build_run, n_trials=1, output_dir=tmp_path)
    with pytest.raises(treadle.ConfigError, match="earlier trial"):
        treadle_optuna.search(build_run, n_trials=1, output_dir=tmp_path)


@pytest.mark.timeout(60)
def test_a_diverged_trial_is_pruned_without_a_pruner(tmp_path: Path) -> None:
    def build_run(trial: optuna.Trial) -> treadle.Run:
        return toy_run(1e12, treadle_optuna.trial_dir(trial))  # the eval loss overflows

    result = treadle_optuna.search(build_run, n_trials=1, pruner="none", output_dir=tmp_path)
    (trial,) = result.study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert not math.isfinite(trial.intermediate_values[EVAL_EVERY])
    assert trial.user_attrs["steps"] == EVAL_EVERY
    assert result.best_trial is None and result.best_run_file is None


def test_a_run_file_search_needs_a_space(run_files: tuple[Path, Path]) -> None:
    with pytest.raises(treadle.ConfigError, match="needs a space"):
        treadle_optuna.search(run_files[0], n_trials=1)
