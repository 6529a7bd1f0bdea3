"""What every run gets while it runs, beside the providers: SIGTERM and SIGINT turned into a
preemption (``run.preempt``), and the warnings about what would otherwise go unnoticed (a
non-finite training loss, batching options a ready DataLoader ignores, a ``keep_best`` metric
never logged); ``check_monitor``, the composition check early stopping and keep-best share.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import warnings
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader

from treadle.config import Config
from treadle.errors import ConfigError, TreadleWarning
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.run import Run


def check_monitor(run: Run, metric: str, who: str) -> None:
    """Refuse (``ConfigError``) a monitored evaluation metric that can never be logged, and
    warn when it can be logged only once, at the end of ``fit``.

    ``who`` names the option in messages, e.g. ``"early-stopping monitor"``. A metric is
    an evaluation metric when its prefix is an eval set's name (``"eval/..."`` for one
    set, the mapping's keys for several).
    """
    prefix = metric.partition("/")[0] if "/" in metric else None
    names = [str(key) for key in run.eval_data] if isinstance(run.eval_data, Mapping) else ["eval"]
    if prefix is None or (prefix != "eval" and prefix not in names):
        return  # a training or plugin metric: logged on the run's own schedule
    config = run.config
    if run.eval_data is None or prefix not in names:
        logged = (
            "no eval_data was given"
            if run.eval_data is None
            else (f"the eval sets are named {', '.join(map(repr, names))}")
        )
        raise ConfigError(
            f"{who} {metric!r} is an evaluation metric that is never logged: {logged}. "
            "Pass eval_data (with Config.eval_every or eval_every_epoch), or monitor a "
            "metric that is logged."
        )
    if config.eval_every is None and not config.eval_every_epoch:
        when = "once, at the end of fit" if config.eval_at_end else "never (eval_at_end=False)"
        if not config.eval_at_end:
            raise ConfigError(
                f"{who} {metric!r} is never logged: evaluation runs {when}. "
                "Set Config.eval_every or eval_every_epoch."
            )
        warnings.warn(
            f"{who} {metric!r} is logged only {when}, so it can act only once. Set "
            "Config.eval_every (steps) or eval_every_epoch=True to evaluate during training.",
            TreadleWarning,
            stacklevel=3,
        )


@hookimpl(trylast=True)
def on_init_end(run: Run) -> None:
    _warn_unused_loader_options(run)


#: per run: the data and batching options last checked by the warning below
_CHECKED: weakref.WeakKeyDictionary[Run, tuple[Any, ...]] = weakref.WeakKeyDictionary()
_BATCHING = ("batch_size", "eval_batch_size", "shuffle", "drop_last")


def _warn_unused_loader_options(run: Run) -> None:
    """Warn about the batching options the default ``make_train_loader`` cannot apply (when
    the run is composed, and again at a fit that changed the data or the config)."""
    options = tuple(getattr(run.config, name) for name in _BATCHING)
    checked = (id(run.train_data), id(run.eval_data), *options)
    if _CHECKED.get(run) == checked or not isinstance(run.train_data, DataLoader):
        return
    _CHECKED[run] = checked
    config, defaults_ = run.config, Config()
    ignored = [
        f"{field}={getattr(config, field)!r}"
        for field in ("shuffle", "drop_last")
        if getattr(config, field) != getattr(defaults_, field)
    ]
    eval_sets = (
        list(run.eval_data.values()) if isinstance(run.eval_data, Mapping) else [run.eval_data]
    )
    batch_size_used = config.eval_batch_size is None and any(
        d is not None and not isinstance(d, DataLoader) for d in eval_sets
    )
    if config.batch_size is not None and not batch_size_used:
        ignored.insert(0, f"batch_size={config.batch_size!r}")
    if ignored:
        warnings.warn(
            f"Config.{', Config.'.join(ignored)} cannot take effect: train_data is a ready "
            "DataLoader, which batches (and shuffles) as it was built. Set these on the "
            "DataLoader, or pass its Dataset as train_data to let treadle batch it.",
            TreadleWarning,
            stacklevel=2,
        )


@hookimpl(trylast=True)
def on_fit_end(run: Run) -> None:
    """Restore the signal handlers; say when ``keep_best`` had nothing to rank checkpoints by
    in this fit."""
    _restore_handlers(run)
    config, fit_state = run.config, run.fit_state
    if not config.keep_best or config.monitor is None or fit_state.monitor_logged:
        return
    if not run.is_main_process or fit_state.preempted:
        return
    logged = sorted(set(run.state.last_metrics) - {"step", "epoch"}) or ["(nothing)"]
    warnings.warn(
        f"Config.monitor {config.monitor!r} was never logged during this fit, so keep_best "
        f"could rank no checkpoint. Logged metrics: {', '.join(logged)}.",
        TreadleWarning,
        stacklevel=2,
    )


# ------------------------------------------------------------------ while a fit runs


#: per run while its fit runs: the signal handlers replaced (to restore), and whether a
#: non-finite training loss was reported already (once per fit)
_PREVIOUS_HANDLERS: weakref.WeakKeyDictionary[Run, dict[int, Any]] = weakref.WeakKeyDictionary()
_WARNED_NON_FINITE: weakref.WeakSet[Run] = weakref.WeakSet()


@hookimpl(trylast=True)
def on_fit_begin(run: Run) -> None:
    """While ``fit`` runs: on SIGTERM or SIGINT, finish the step, save and stop on every rank
    (``run.preempt``).

    The handlers are installed only in the main thread and the previous ones are restored when
    the fit ends. A second signal is handled as it would have been without treadle (SIGINT
    raises ``KeyboardInterrupt``, SIGTERM ends the process).
    """
    _WARNED_NON_FINITE.discard(run)
    _warn_unused_loader_options(run)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = _PREVIOUS_HANDLERS[run] = {}

    def handle(signum: int, frame: Any) -> None:
        if run.fit_state.signal is not None:  # the second one: the user insists
            handler = previous.get(signum, signal.SIG_DFL)
            _restore_handlers(run)
            if callable(handler):
                handler(signum, frame)
            elif handler != signal.SIG_IGN:
                signal.raise_signal(signum)
            return
        name = signal.Signals(signum).name
        run.preempt(f"preempted ({name})", signum)
        if run.is_main_process:
            report(2, f"treadle: {name} received; finishing this step, saving and stopping "
                      f"(send {name} again to stop at once)\n")  # fmt: skip

    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[signum] = signal.signal(signum, handle)
        except (ValueError, OSError):  # not settable here (an embedding interpreter)
            continue


@hookimpl(trylast=True)
def on_exception(run: Run) -> None:
    _restore_handlers(run)


def _restore_handlers(run: Run) -> None:
    for signum, handler in _PREVIOUS_HANDLERS.pop(run, {}).items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@hookimpl(trylast=True)
def on_log(run: Run, metrics: Mapping[str, float]) -> None:
    """Warn once per fit when the training loss is not finite, unless a plugin handles that."""
    loss = metrics.get("loss")
    if loss is None or math.isfinite(loss) or run in _WARNED_NON_FINITE:
        return
    _WARNED_NON_FINITE.add(run)
    if not run.is_main_process or any(
        getattr(plugin, "treadle_handles_non_finite", False) is True
        for plugin in run.plugin_manager.get_plugins()
    ):
        return  # a plugin acts on non-finite values itself (numeric-guard does)
    warnings.warn(
        f"the training loss logged at step {run.state.step} is {loss}: the run has "
        "diverged or its data holds non-finite values, and later checkpoints will hold "
        "such weights. Add plugins=['numeric-guard'] to find the first bad step and stop "
        "or skip it.",
        TreadleWarning,
        stacklevel=2,
    )


def report(fd: int, text: str) -> None:
    """Write ``text`` to ``fd`` with one system call; a write that fails is dropped.

    os.write, not print: a signal handler may interrupt a print to the same stream. Nothing
    that reports progress may stop a save: after ``python train.py 2>&1 | tee log`` the
    terminal's Ctrl-C kills ``tee`` too, and the write raises ``BrokenPipeError``.
    """
    try:
        os.write(fd, text.encode())
    except BrokenPipeError:
        discard_output(fd)
    except OSError:  # closed, or a full disk: the message is lost, the run goes on
        pass


def discard_output(fd: int) -> None:
    """Point ``fd``, whose reader is gone, at the null device: later writes to it (warnings, a
    traceback, the interpreter's last flush, which would change the exit code to 120) succeed
    instead of failing again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(null, fd)
    except OSError:
        pass
    finally:
        os.close(null)
