"""``console``: a progress bar while training, readable lines where there is no terminal.

On an interactive terminal the logger draws a tqdm bar over the fit's optimizer steps, whose
postfix shows the loss, learning rate and throughput of the last training log, plus a nested
bar (removed when done) during each evaluation; evaluation results are printed above the bar so
they stay on screen. When the output is not a terminal (CI, ``nohup``, a file) a redrawn bar
would fill the log with carriage returns, so the logger prints one plain line per ``on_log``
instead. Either way ``finish`` prints a one-line summary.

A stream that fails (``python train.py 2>&1 | tee log`` whose ``tee`` died of the same Ctrl-C:
``BrokenPipeError``) is given up at its first failure, silently: reporting progress must never
stop a run, least of all the save that follows an interrupt.

Cost per step: ``on_step_end`` only counts the step and compares ``time.perf_counter()`` with the
next redraw time; the bar is advanced (``bar.update(n)``) at most every ``refresh_s`` seconds.
It never reads the loss tensor, so it adds no host-device synchronisation.

tqdm is imported only when a bar is drawn, so ``import treadle`` does not import it. The plain
``tqdm`` class is used, not ``tqdm.auto``: a notebook's output is not a terminal, so notebooks get
the plain lines, which need no widget library.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TextIO

from treadle.components import Logger
from treadle.errors import ConfigError
from treadle.hookspecs import hookimpl
from treadle.plugins.defaults import discard_output

if TYPE_CHECKING:
    from pathlib import Path

    from treadle.run import Run

__all__ = ["ConsoleLogger", "format_metrics"]

# Shown first, in this order, when present; every other key follows in logged order.
_LEADING_KEYS = ("loss", "lr")
# On the training bar; the last two come from the throughput plugin.
_POSTFIX_KEYS = ("loss", "lr", "samples_per_s", "tokens_per_s", "step_time_s",
                 "throughput/tokens_per_s", "throughput/mfu")  # fmt: skip
# Never shown as metrics: they are the position, printed separately.
_POSITION_KEYS = ("step", "epoch")


def _format_value(key: str, value: Any) -> str:
    """A compact, fixed-style rendering of one metric value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    if key == "lr" or key.endswith("/lr") or key.startswith("lr"):
        return f"{value:.3e}"
    if key.endswith("_per_s"):
        return f"{value:.1f}"
    if key.endswith("_s"):
        return f"{value:.4f}"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """``key=value`` pairs for every metric except the position keys (``step``, ``epoch``)."""
    keys = [k for k in _LEADING_KEYS if k in metrics]
    keys += [k for k in metrics if k not in _LEADING_KEYS and k not in _POSITION_KEYS]
    return " ".join(f"{k}={_format_value(k, metrics[k])}" for k in keys)


def _format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _is_tty(file: Any) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):  # closed or not a real stream
        return False


class ConsoleLogger(Logger):
    """Progress bar on a terminal, one line per log otherwise; main process only.

    Options:
        refresh_s: least wall time between two redraws of a bar (seconds, >= 0).
        disable: print nothing at all.
        bar: force the bar (True) or the plain lines (False); ``None`` (the default) draws a bar
            exactly when ``file`` is a terminal.
        file: where to write; ``None`` means ``sys.stderr`` as it is when the fit starts
            (looked up late so that redirections and test capture apply).
    """

    name: ClassVar[str] = "console"

    def __init__(
        self,
        refresh_s: float = 0.1,
        disable: bool = False,
        bar: bool | None = None,
        file: TextIO | None = None,
    ) -> None:
        if (
            isinstance(refresh_s, bool)
            or not isinstance(refresh_s, int | float)
            or not math.isfinite(refresh_s)
            or refresh_s < 0
        ):
            raise ConfigError(
                f"console logger option refresh_s = {refresh_s!r} is not allowed: "
                "expected a finite number of seconds >= 0"
            )
        if not isinstance(disable, bool):
            raise ConfigError(
                f"console logger option disable = {disable!r} is not allowed: "
                "expected True or False"
            )
        if bar is not None and not isinstance(bar, bool):
            raise ConfigError(
                f"console logger option bar = {bar!r} is not allowed: "
                "expected True, False or None (a bar exactly when writing to a terminal)"
            )
        if file is not None and not callable(getattr(file, "write", None)):
            raise ConfigError(
                f"console logger option file = {file!r} is not allowed: "
                "expected a text stream with a write() method, or None for stderr"
            )
        self.refresh_s = float(refresh_s)
        self.disable = disable
        self.bar = bar
        self.file = file
        self._run: Run | None = None
        self._out: TextIO = sys.stderr
        self._use_bar = False
        self._train_bar: Any = None
        self._eval_bar: Any = None
        self._pending = 0  # steps taken but not yet shown on the training bar
        self._eval_pending = 0
        self._next_draw = 0.0
        self._total: int | None = None
        self._fit_start_step = 0
        self._fit_start_time = time.perf_counter()
        self._last_loss: float | None = None
        self._failure: BaseException | None = None
        self._reported_resume: Path | None = None

    # ------------------------------------------------------------------ Logger interface

    def start(self, run: Run) -> None:
        """Pick the output stream and the mode (bar or lines) for this run."""
        self._run = run
        self._out = self.file if self.file is not None else sys.stderr
        self._use_bar = not self.disable and (
            self.bar if self.bar is not None else _is_tty(self._out)
        )
        self._failure = None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Update the bar's postfix (training logs) or print a line (everything else)."""
        if self.disable:
            return
        try:
            self._log(metrics, step)
        except (OSError, ValueError) as exc:
            self._give_up(exc)

    def _log(self, metrics: Mapping[str, float], step: int) -> None:
        is_train = "loss" in metrics or "lr" in metrics
        if "loss" in metrics:
            self._last_loss = float(metrics["loss"])
        if self._use_bar and self._train_bar is not None:
            self._flush_train()
            if is_train:
                self._train_bar.set_postfix_str(self._postfix(metrics), refresh=True)
                return
            # Evaluation results (and plugins' own logs) are printed above the bar so they
            # stay visible after the bar moves on.
            self._write(self._line(metrics, step))
            return
        self._write(self._line(metrics, step))

    def finish(self) -> None:
        """Close the bars and print one summary line."""
        try:
            self._close_eval_bar()
            if self._train_bar is not None:
                self._flush_train()
                self._train_bar.close()
                self._train_bar = None
            if self.disable or self._run is None:
                return
            self._write(self._summary(self._run))
        except (OSError, ValueError) as exc:
            self._give_up(exc)

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_fit_begin(self, run: Run) -> None:
        super().on_fit_begin(run)
        if not self._active(run):
            return
        self._fit_start_step = run.state.step
        self._fit_start_time = time.perf_counter()
        self._last_loss = None
        self._failure = None
        # ``run.total_steps`` is the step the run ends at (a total over the run's life, as
        # schedulers see it), so the bar counts absolute steps: a resumed run shows "37/100".
        self._total = run.total_steps
        try:
            if not self.disable:
                self._write(self._header(run))
        except (OSError, ValueError) as exc:
            self._give_up(exc)
        if self._use_bar:
            try:
                self._open_train_bar()
            except (OSError, ValueError) as exc:
                self._give_up(exc)

    @hookimpl
    def on_step_end(self, run: Run) -> None:
        # The hot path: one increment and one clock comparison per step.
        if self._train_bar is None:
            return
        self._pending += 1
        if time.perf_counter() >= self._next_draw:
            try:
                self._flush_train()
            except (OSError, ValueError) as exc:
                self._give_up(exc)

    @hookimpl
    def on_eval_begin(self, run: Run, name: str) -> None:
        if not self._active(run):
            return
        if not self._started:  # a standalone evaluate(): no on_fit_begin started us
            self._started = True
            self.start(run)
        if not self._use_bar:
            return
        from tqdm import tqdm

        try:
            self._close_eval_bar()
            self._eval_pending = 0
            self._eval_bar = tqdm(
                total=run.eval_length(name),
                desc=name,
                unit="batch",
                leave=False,
                file=self._out,
                dynamic_ncols=True,
                mininterval=0,
                miniters=1,
            )
        except (OSError, ValueError) as exc:
            self._give_up(exc)

    @hookimpl
    def on_eval_step_end(self, run: Run) -> None:
        if self._eval_bar is None:
            return
        self._eval_pending += 1
        if time.perf_counter() >= self._next_draw:
            try:
                self._eval_bar.update(self._eval_pending)
            except (OSError, ValueError) as exc:
                self._give_up(exc)
                return
            self._eval_pending = 0
            self._next_draw = time.perf_counter() + self.refresh_s

    @hookimpl
    def on_eval_end(self, run: Run) -> None:
        try:
            self._close_eval_bar()
        except (OSError, ValueError) as exc:
            self._give_up(exc)

    @hookimpl
    def on_exception(self, run: Run, exception: BaseException) -> None:
        # Remember why, so the summary says the fit failed rather than finished.
        self._failure = exception
        super().on_exception(run)

    # ------------------------------------------------------------------ internals

    def _open_train_bar(self) -> None:
        from tqdm import tqdm

        if self._train_bar is not None:
            self._train_bar.close()
        self._pending = 0
        # mininterval=0/miniters=1: tqdm draws whenever update() is called; the throttling is
        # ours (refresh_s), which keeps the per-step cost to a clock read.
        self._train_bar = tqdm(
            total=self._total,
            initial=self._fit_start_step,
            desc="train",
            unit="step",
            file=self._out,
            dynamic_ncols=True,
            mininterval=0,
            miniters=1,
            leave=True,
        )
        self._next_draw = time.perf_counter() + self.refresh_s

    def _flush_train(self) -> None:
        if self._pending:
            self._train_bar.update(self._pending)
            self._pending = 0
        self._next_draw = time.perf_counter() + self.refresh_s

    def _close_eval_bar(self) -> None:
        if self._eval_bar is not None:
            if self._eval_pending:
                self._eval_bar.update(self._eval_pending)
                self._eval_pending = 0
            self._eval_bar.close()
            self._eval_bar = None

    def _postfix(self, metrics: Mapping[str, float]) -> str:
        shown = {k: metrics[k] for k in _POSTFIX_KEYS if k in metrics}
        return format_metrics(shown)

    def _line(self, metrics: Mapping[str, float], step: int) -> str:
        position = f"step {step}" if self._total is None else f"step {step}/{self._total}"
        if "epoch" in metrics:
            position += f", epoch {_format_value('epoch', metrics['epoch'])}"
        return f"[{position}] {format_metrics(metrics)}".rstrip()

    def _header(self, run: Run) -> str:
        """What is trained: the model's parameters, and where a resumed run continues from."""
        parameters = list(run.model.parameters())
        total = sum(p.numel() for p in parameters)
        trainable = sum(p.numel() for p in parameters if p.requires_grad)
        text = (
            f"treadle: training {type(run.model).__name__} with {total:,} parameters "
            f"({trainable:,} trainable)"
        )
        if run.resumed_from is not None and run.resumed_from != self._reported_resume:
            self._reported_resume = run.resumed_from  # a later fit() of this run goes on
            text += f"; resumed from step {run.state.step} of {run.resumed_from}"
        return text

    def _summary(self, run: Run) -> str:
        step = run.state.step
        done = step - self._fit_start_step
        elapsed = _format_duration(time.perf_counter() - self._fit_start_time)
        text = f"treadle: {done} steps in {elapsed} (at step {step})"
        if self._last_loss is not None:
            text += f", final loss {_format_value('loss', self._last_loss)}"
        if self._failure is not None:
            detail = str(self._failure)
            text += f"; failed: {type(self._failure).__name__}" + (f": {detail}" if detail else "")
        else:
            reason = getattr(run.state, "stop_reason", None)
            if reason:
                text += f"; stopped: {reason}"
        return text

    def _give_up(self, exc: BaseException) -> None:
        """The stream failed (a reader that is gone, a closed file): write nothing more to it."""
        self.disable = True
        for bar in (self._train_bar, self._eval_bar):
            if bar is not None:
                bar.disable = True  # so that tqdm's close() at exit writes nothing either
        self._train_bar = self._eval_bar = None
        self._use_bar = False
        if isinstance(exc, BrokenPipeError):
            try:
                fd = self._out.fileno()
            except (AttributeError, OSError, ValueError):
                return
            if fd in (1, 2):  # the interpreter's last flush of it would fail and exit 120
                discard_output(fd)

    def _write(self, line: str) -> None:
        if self._use_bar:
            from tqdm import tqdm

            # tqdm.write clears and redraws open bars around the line.
            tqdm.write(line, file=self._out)
        else:
            print(line, file=self._out, flush=True)
