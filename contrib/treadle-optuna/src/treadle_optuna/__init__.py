"""Hyperparameter search for treadle over Optuna.

``search(build_run, space, n_trials=..., ...)`` runs an Optuna study whose trials are treadle
runs: every evaluation is reported to the trial, a pruned trial stops at that step boundary,
each trial writes to ``output_dir/trial-NNNN`` and the best trial is written as a run file
(``output_dir/best.toml``). ``treadle search RUN.toml --space SPACE.toml --trials N`` does the
same from the command line.
"""

from treadle_optuna.reporter import TrialReporter
from treadle_optuna.search import SearchResult, open_storage, search, trial_dir
from treadle_optuna.space import Param, apply, params, parse_space, suggest

__all__ = [
    "Param",
    "SearchResult",
    "TrialReporter",
    "apply",
    "open_storage",
    "params",
    "parse_space",
    "search",
    "suggest",
    "trial_dir",
]

__version__ = "0.1.0"
