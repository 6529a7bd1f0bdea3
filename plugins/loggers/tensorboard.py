"""``tensorboard``: scalars, hyperparameters and text in TensorBoard event files.

Every logged metric becomes a scalar series (x = ``step``). Tags are namespaced as users of
the HF ``Trainer`` and Lightning expect: a name that has no namespace of its own gets
``train/`` (``train/loss``, ``train/lr``, ``train/epoch``), while ``eval/loss`` or
``throughput/mfu`` keep theirs; ``train_prefix=""`` keeps the bare names. At start the run's configuration is written twice: as hyperparameters (the
HParams dashboard, so runs can be compared by their settings) and as a text table (the Text
dashboard). ``log_text(tag, text, step)`` adds your own text. Files go to
``<output_dir>/tensorboard`` unless ``log_dir`` says otherwise; view them with
``tensorboard --logdir <output_dir>``.

Writing uses ``torch.utils.tensorboard.SummaryWriter``, which needs the ``tensorboard``
package (``pip install "treadle[tensorboard]"``); it is imported when the logger starts, not
when treadle is.

Decisions:

* Scalars are stored as 32-bit floats (TensorBoard's format): read-back values equal the
  logged ones to float32 precision.
* When a ``fit()`` resumes from a checkpoint at step N, the writer is opened with
  ``purge_step = N + 1``: TensorBoard hides the events a crashed run wrote after that
  checkpoint, as ``jsonl`` drops those lines (``rewind_on_resume=False`` keeps them).
* Hyperparameter values that are not numbers, strings or booleans (None, lists) are shown as
  their JSON text; nested options are flattened with ``/`` (``optimizer/lr``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from treadle.components import Logger
from treadle.errors import ConfigError, MissingDependencyError, require
from treadle.hookspecs import hookimpl
from treadle.plugins.loggers.jsonl import flatten

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["TensorBoardLogger"]


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value)


def _markdown_table(values: Mapping[str, Any]) -> str:
    lines = ["| setting | value |", "|---|---|"]
    for key, value in values.items():
        text = json.dumps(value) if not isinstance(value, str) else value
        lines.append(f"| {key} | {text.replace('|', '&#124;')} |")
    return "\n".join(lines)


def _check_installed() -> None:
    """Fail with the install command if tensorboard is missing, without importing it (that waits
    for ``start``)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise MissingDependencyError("the tensorboard logger", "tensorboard", "tensorboard")


class TensorBoardLogger(Logger):
    """TensorBoard event files; main process only.

    Options:
        log_dir: where the event files go; relative paths are taken relative to
            ``run.output_dir``. Default ``run.output_dir / "tensorboard"``.
        flush_secs: the writer flushes pending events at least this often (seconds).
        hparams: write the configuration as hyperparameters and as a text table.
        rewind_on_resume: on resume at step N, hide events written after step N.
        train_prefix: put before metric names without a ``/`` (default ``"train/"``; ``""``
            for none).
    """

    name: ClassVar[str] = "tensorboard"

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        flush_secs: float = 30.0,
        hparams: bool = True,
        rewind_on_resume: bool = True,
        train_prefix: str = "train/",
    ) -> None:
        if log_dir is not None and (
            not isinstance(log_dir, str | os.PathLike) or not os.fspath(log_dir)
        ):
            raise ConfigError(
                f"tensorboard logger option log_dir = {log_dir!r} is not allowed: expected a "
                "directory path, or None for <output_dir>/tensorboard"
            )
        if (
            isinstance(flush_secs, bool)
            or not isinstance(flush_secs, int | float)
            or flush_secs <= 0
        ):
            raise ConfigError(
                f"tensorboard logger option flush_secs = {flush_secs!r} is not allowed: "
                "expected a number of seconds > 0"
            )
        for option, value in (("hparams", hparams), ("rewind_on_resume", rewind_on_resume)):
            if not isinstance(value, bool):
                raise ConfigError(
                    f"tensorboard logger option {option} = {value!r} is not allowed: "
                    "expected True or False"
                )
        if not isinstance(train_prefix, str):
            raise ConfigError(
                f"tensorboard logger option train_prefix = {train_prefix!r} is not allowed: "
                'expected a string such as "train/", or "" for none'
            )
        _check_installed()  # a missing library fails when the run is composed, not later
        self.train_prefix = train_prefix
        self.log_dir = log_dir
        self.flush_secs = flush_secs
        self.hparams = hparams
        self.rewind_on_resume = rewind_on_resume
        self._writer: Any = None
        self._purge_step: int | None = None
        #: the directory holding the event files; set by ``start``.
        self.directory: Path | None = None

    # ------------------------------------------------------------------ Logger interface

    def start(self, run: Run) -> None:
        """Open the writer; write the configuration as hyperparameters and text."""
        require("tensorboard", extra="tensorboard", what="the tensorboard logger")
        from torch.utils.tensorboard import SummaryWriter

        directory = Path(run.output_dir) / "tensorboard"
        if self.log_dir is not None:
            directory = Path(self.log_dir).expanduser()
            if not directory.is_absolute():
                directory = Path(run.output_dir) / directory
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._writer = SummaryWriter(
            log_dir=str(directory),
            flush_secs=int(max(1, self.flush_secs)),
            purge_step=self._purge_step,
        )
        self._purge_step = None
        if self.hparams:
            self._write_hparams(flatten(run.hparams()), run.state.step)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """One scalar event per metric (``step`` is the x-axis, not a series)."""
        if self._writer is None:
            return
        for key, value in metrics.items():
            if key == "step":
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue  # not a number: nothing to plot
            tag = key if "/" in key else self.train_prefix + key
            self._writer.add_scalar(tag, number, global_step=step)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        """Add ``text`` (markdown) under ``tag`` to the Text dashboard."""
        if self._writer is not None:
            self._writer.add_text(tag, text, global_step=step)

    def finish(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_fit_begin(self, run: Run) -> None:
        step = run.state.step
        if self.rewind_on_resume and step > 0 and not self._started:
            self._purge_step = step + 1
        super().on_fit_begin(run)
        self._purge_step = None

    # ------------------------------------------------------------------ internals

    def _write_hparams(self, values: dict[str, Any], step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        experiment, start, end = hparams({k: _hparam_value(v) for k, v in values.items()}, {})
        file_writer = self._writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary, global_step=step)
        self._writer.add_text("config", _markdown_table(values), global_step=step)
