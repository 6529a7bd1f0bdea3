"""``search``: an Optuna study whose trials are treadle runs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import optuna

import treadle
from treadle import ConfigError
from treadle_optuna import runfile
from treadle_optuna.reporter import TrialReporter
from treadle_optuna.space import Param, apply, parse_space, suggest

__all__ = ["SearchResult", "open_storage", "search", "trial_dir"]

BuildRun = Callable[[optuna.Trial], treadle.Run]
_PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive-halving": optuna.pruners.SuccessiveHalvingPruner,
    "none": optuna.pruners.NopPruner,
}
_SAMPLERS = ("tpe", "random")


@dataclass
class SearchResult:
    """What a search leaves: the study (every worker's trials) and its best trial."""

    study: optuna.Study
    best_trial: optuna.trial.FrozenTrial | None
    #: ``output_dir/best.toml``: the best trial as a run file (None without a run file to
    #: start from, or without a completed trial)
    best_run_file: Path | None
    output_dir: Path

    @property
    def best_value(self) -> float | None:
        return None if self.best_trial is None else self.best_trial.value

    @property
    def best_params(self) -> dict[str, Any]:
        return {} if self.best_trial is None else dict(self.best_trial.params)


def trial_dir(trial: optuna.Trial | optuna.trial.FrozenTrial) -> Path:
    """The trial's own output directory (``output_dir/trial-NNNN``), for ``build_run``."""
    return Path(trial.user_attrs["output_dir"])


def search(
    build_run: BuildRun | str | Path,
    space: Mapping[str, Any] | str | Path | None = None,
    *,
    n_trials: int,
    direction: str = "minimize",
    metric: str = "eval/loss",
    storage: str | optuna.storages.BaseStorage | None = None,
    pruner: str | optuna.pruners.BasePruner = "median",
    sampler: str | optuna.samplers.BaseSampler = "tpe",
    seed: int | None = None,
    study_name: str | None = None,
    output_dir: str | Path = "runs/search",
    run_file: str | Path | Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> SearchResult:
    """Run ``n_trials`` trials (in this process) of the study and return its best trial.

    Args:
        build_run: ``build_run(trial) -> treadle.Run``, or the path of a run file that each
            trial runs with the sampled ``space`` values written into it.
        space: the declarative search space (``treadle_optuna.space``: a TOML file or a
            mapping). Its values are sampled before ``build_run(trial)`` is called, so it finds
            them in ``trial.params`` (``treadle_optuna.params(trial, "optimizer")``). Without
            it, ``build_run`` calls ``trial.suggest_*`` itself; name parameters by their place
            in a run file (``"optimizer.lr"``) for the best run file to hold them.
        n_trials: trials this call runs; workers sharing a study each run their own.
        direction: "minimize" or "maximize" ``metric``.
        metric: the logged evaluation metric reported to the trial after every evaluation;
            its last value is the trial's value.
        storage: None (in memory), ``"sqlite:///path.db"`` (shared by workers) or any Optuna
            storage URL or object.
        pruner: "median", "hyperband", "successive-halving", "none" or an Optuna pruner.
        sampler: "tpe", "random" or an Optuna sampler; ``seed`` seeds a named one.
        study_name: the study to create or join (needed for workers to share one).
        output_dir: holds ``trial-NNNN/`` per trial, ``best.toml`` and ``best.json``.
        run_file: with a callable ``build_run``, the run file (path or table) whose model and
            data the best run file names; the best parameters are written into it.
        timeout: stop starting trials after this many seconds.
    """
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"n_trials must be an integer >= 1, got {n_trials!r}")
    params = parse_space(space)
    output_dir = Path(output_dir)
    base: Mapping[str, Any] | None
    if isinstance(build_run, str | Path):
        if not params:
            raise ConfigError(
                f"a search over the run file {build_run} needs a space: the values to sample"
            )
        base, build = _from_run_file(Path(build_run))
    elif callable(build_run):
        base = runfile.read(run_file) if isinstance(run_file, str | Path) else run_file
        build = build_run
    else:
        raise ConfigError(
            f"build_run must be a callable taking the trial or a run file path, got "
            f"{type(build_run).__name__}"
        )
    study = _open_study(storage, study_name, direction, _pruner(pruner), _sampler(sampler, seed))
    objective = _objective(build, params, metric, output_dir)
    study.optimize(objective, n_trials=n_trials, timeout=timeout)
    best = _best_trial(study)
    best_file = None
    if best is not None:
        best_file = _write_best(best, base, output_dir, study.study_name, metric, direction)
    return SearchResult(study, best, best_file, output_dir)


def _objective(
    build: BuildRun, params: Sequence[Param], metric: str, output_dir: Path
) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        directory = output_dir / f"trial-{trial.number:04d}"
        if directory.exists() and any(p.name != "run.toml" for p in directory.iterdir()):
            raise ConfigError(
                f"{directory} holds an earlier trial's output (a study whose trial numbers "
                "start again at 0?): give this search another output_dir, or remove it"
            )
        trial.set_user_attr("output_dir", str(directory))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        suggest(trial, params)
        run = build(trial)
        if not isinstance(run, treadle.Run):
            raise ConfigError(f"build_run returned {type(run).__name__}, not a treadle.Run")
        reporter = TrialReporter(trial, metric)
        run.add_plugin(reporter)
        changes = {} if Path(run.config.output_dir) == directory else {"output_dir": str(directory)}
        with run:
            state = run.fit(**changes)
        trial.set_user_attr("steps", state.step)
        trial.set_user_attr("stop_reason", state.stop_reason)
        if reporter.pruned_at is not None:
            raise optuna.TrialPruned(state.stop_reason)
        value = reporter.last_value
        if value is None:
            value = state.last_metrics.get(metric)
        if value is None:
            logged = sorted(set(state.last_metrics) - {"step", "epoch"})
            raise ConfigError(
                f"the trial's run never logged {metric!r} (logged: {logged or 'nothing'}); give "
                "it eval_data (evaluated at the end of fit by default) or choose another metric"
            )
        return float(value)

    return objective


def _from_run_file(path: Path) -> tuple[dict[str, Any], BuildRun]:
    """Each trial runs ``trial-NNNN/run.toml``: the run file with the trial's values."""
    from treadle.plugins.commands.runfile import build_run

    base = runfile.read(path)
    # as for `treadle run RUN.toml`: the run file's directory holds the modules it names
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)

    def build(trial: optuna.Trial) -> treadle.Run:
        spec = _with_output_dir(apply(base, trial.params), trial_dir(trial))
        trial_file = runfile.write(
            trial_dir(trial) / "run.toml", spec, f"trial {trial.number} of a search over {path}"
        )
        return build_run(trial_file)

    return base, build


def _with_output_dir(spec: Mapping[str, Any], directory: Path) -> dict[str, Any]:
    config = dict(spec.get("config", {}))
    config["output_dir"] = str(directory)
    return {**spec, "config": config}


def _write_best(
    best: optuna.trial.FrozenTrial,
    base: Mapping[str, Any] | None,
    output_dir: Path,
    study_name: str,
    metric: str,
    direction: str,
) -> Path | None:
    """``best.json`` (and ``best.toml`` with a run file to start from), never replacing a
    better trial of the same study: workers finish in any order, each with its own view."""
    best_file = None if base is None else output_dir / "best.toml"
    summary = {
        "study": study_name,
        "trial": best.number,
        "metric": metric,
        "value": best.value,
        "params": best.params,
        "output_dir": best.user_attrs.get("output_dir"),
        "run_file": None if best_file is None else str(best_file),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(output_dir / ".best.lock"):
        if _recorded_is_better(output_dir / "best.json", summary, direction):
            return best_file
        # first: it holds the parameters even if they name no place in the run file (below)
        temporary = output_dir / f".best.json.{os.getpid()}.tmp"
        temporary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, output_dir / "best.json")
        if base is not None and best_file is not None:
            spec = _with_output_dir(apply(base, best.params), output_dir / "best")
            header = (
                f"the best trial ({best.number}, {metric} = {best.value!r}) of the study "
                f"{study_name!r}\ntrain it again: treadle run {best_file}"
            )
            runfile.write(best_file, spec, header)
    return best_file


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """One worker at a time (an advisory file lock where the platform has one)."""
    with open(path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: workers sharing a study there may race on best.*
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _recorded_is_better(path: Path, summary: Mapping[str, Any], direction: str) -> bool:
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or recorded.get("study") != summary["study"]:
        return False  # another study's: this search's result replaces it
    value = recorded.get("value")
    if not isinstance(value, int | float):
        return False
    if direction == "minimize":
        return bool(value < summary["value"])
    return bool(value > summary["value"])


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value)
    ]
    if not complete:
        return None
    return study.best_trial


def open_storage(
    storage: str | optuna.storages.BaseStorage | None,
) -> str | optuna.storages.BaseStorage | None:
    """A SQLite URL becomes a storage that waits for the file's lock (workers write in turn)
    rather than failing at once; its directory is created."""
    if not isinstance(storage, str) or not storage.startswith("sqlite:///"):
        return storage
    database = Path(storage.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": 60.0}})


def _open_study(
    storage: Any,
    study_name: str | None,
    direction: str,
    pruner: optuna.pruners.BasePruner,
    sampler: optuna.samplers.BaseSampler,
) -> optuna.Study:
    if storage is not None and study_name is None:
        raise ConfigError(
            "a stored study needs a study_name: the name workers share (and a later search "
            "continues)"
        )
    # Workers started together race to create the tables and the study: the loser retries.
    for attempt in range(5):
        try:
            return optuna.create_study(
                storage=open_storage(storage),
                study_name=study_name,
                direction=cast(Literal["minimize", "maximize"], direction),
                pruner=pruner,
                sampler=sampler,
                load_if_exists=True,
            )
        except Exception as exc:
            if attempt == 4 or "sqlalchemy" not in type(exc).__module__ + str(exc).lower():
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _pruner(pruner: str | optuna.pruners.BasePruner) -> optuna.pruners.BasePruner:
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner
    if pruner not in _PRUNERS:
        raise ConfigError(f"pruner {pruner!r}: expected one of {', '.join(_PRUNERS)} or a pruner")
    return _PRUNERS[pruner]()


def _sampler(
    sampler: str | optuna.samplers.BaseSampler, seed: int | None
) -> optuna.samplers.BaseSampler:
    if isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"sampler {sampler!r}: expected one of {', '.join(_SAMPLERS)} or a sampler")
