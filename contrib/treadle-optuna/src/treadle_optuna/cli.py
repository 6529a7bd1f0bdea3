"""``treadle search RUN.toml --space SPACE.toml --trials N``: a ``treadle.command`` entry point."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from treadle.plugins.commands.runfile import apply_overrides, parse_key_values
from treadle_optuna import runfile
from treadle_optuna.search import _PRUNERS, _SAMPLERS, search

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treadle search",
        description="Search hyperparameters of a run file with Optuna; each trial trains the run "
        "file with the sampled values written into it, and the best trial is written as a run "
        "file (OUTPUT_DIR/best.toml) that `treadle run` trains again.",
    )
    parser.add_argument("run_file", help="the run file (TOML) to search over")
    parser.add_argument(
        "--space",
        required=True,
        help='the search space (TOML), e.g. [optimizer.lr] type = "float" low = 1e-4 '
        "high = 1e-1 log = true",
    )
    parser.add_argument("--trials", type=int, required=True, help="trials this worker runs")
    parser.add_argument("--metric", default="eval/loss", help="default: eval/loss")
    parser.add_argument("--direction", choices=("minimize", "maximize"), default="minimize")
    parser.add_argument(
        "--storage",
        default=None,
        help="sqlite:///study.db to keep the study and share it between workers "
        "(default: in memory)",
    )
    parser.add_argument(
        "--study-name",
        default=None,
        help="the study to create or join (default: the run file's name)",
    )
    parser.add_argument("--output-dir", default=None, help="default: runs/search/STUDY_NAME")
    parser.add_argument("--pruner", choices=tuple(_PRUNERS), default="median")
    parser.add_argument("--sampler", choices=_SAMPLERS, default="tpe")
    parser.add_argument("--seed", type=int, default=None, help="the sampler's seed")
    parser.add_argument("--timeout", type=float, default=None, help="seconds; then no new trial")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a value of the run file in every trial, as for treadle run "
        "(max_steps=100, optimizer.lr=1e-3, ...)",
    )
    return parser


def main(arguments: Sequence[str]) -> int:
    """search a run file's hyperparameters with Optuna; the best trial becomes a run file"""
    args = _parser().parse_args(list(arguments))
    run_file = Path(args.run_file)
    study_name = args.study_name or run_file.stem
    output_dir = Path(args.output_dir or Path("runs/search") / study_name)
    overrides = parse_key_values("--set", args.set)
    if overrides:  # the searched file: the run file with its overrides, next to the trials
        spec = apply_overrides(runfile.read(run_file), overrides)
        # kept beside the original: the modules its import paths name are found from there
        run_file = runfile.write(
            run_file.with_name(f".{run_file.stem}.search.toml"), spec, f"{args.run_file} with --set"
        )
    result = search(
        run_file,
        args.space,
        n_trials=args.trials,
        direction=args.direction,
        metric=args.metric,
        storage=args.storage,
        pruner=args.pruner,
        sampler=args.sampler,
        seed=args.seed,
        study_name=study_name,
        output_dir=output_dir,
        timeout=args.timeout,
    )
    states: dict[str, int] = {}
    for trial in result.study.get_trials(deepcopy=False):
        states[trial.state.name.lower()] = states.get(trial.state.name.lower(), 0) + 1
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    print(f"study {study_name!r}: {counts}")
    if result.best_trial is None:
        print("no trial completed: nothing to write")
        return 1
    print(f"best trial {result.best_trial.number}: {args.metric} = {result.best_value:.6g}")
    for name, value in result.best_params.items():
        print(f"  {name} = {value!r}")
    print(f"best run file: {result.best_run_file}  (treadle run {result.best_run_file})")
    return 0
