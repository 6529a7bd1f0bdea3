"""treadle: a microkernel for training PyTorch models.

The kernel is a small event loop (``treadle.loop``) that emits a pluggy hook at every stage
(``treadle.hookspecs``); strategies, precision, optimizers, schedulers, loggers, checkpoint
formats and callbacks are plugins found through package entry points (``treadle.registry``).
"""

from treadle.checkpoint import load_weights
from treadle.components import CheckpointFormat, CheckpointStore, Logger, Precision, Strategy
from treadle.config import Config
from treadle.errors import (
    CheckpointError,
    ConfigError,
    MissingDependencyError,
    PluginError,
    PluginLoadError,
    Preempted,
    TreadleError,
    TreadleWarning,
    UnknownNameError,
)  # fmt: skip
from treadle.hookspecs import hookimpl, hookspec
from treadle.run import Run, seed_everything
from treadle.state import LossSum, State

__all__ = [
    "CheckpointError", "CheckpointFormat", "CheckpointStore", "Config", "ConfigError",
    "Logger", "LossSum", "MissingDependencyError", "PluginError", "PluginLoadError",
    "Precision", "Preempted", "Run", "State", "Strategy", "TreadleError", "TreadleWarning",
    "UnknownNameError", "hookimpl", "hookspec", "load_weights", "seed_everything",
]  # fmt: skip

__version__ = "0.1.0"
