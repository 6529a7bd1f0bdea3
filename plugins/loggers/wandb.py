"""``wandb``: Weights & Biases, offline unless you say otherwise.

At start the logger calls ``wandb.init`` with the run's configuration (``run.hparams()``) as
the W&B config and ``<output_dir>`` as the directory; every ``on_log`` becomes
``wandb_run.log(metrics, step=step)``; at the end the W&B run is finished (with exit code 1
after an exception).

Decisions:

* **Offline by default.** A training run must not fail, stall or send data because of a
  network or an account it was never told about: ``mode`` is ``"offline"`` unless the option
  or the ``WANDB_MODE`` environment variable says ``"online"``. An offline run is kept under
  ``<output_dir>/wandb/offline-run-*`` and uploaded later with ``wandb sync <that directory>``.
* The W&B step is treadle's optimizer step, so training and evaluation metrics of one step
  share a row. W&B rejects a step lower than one already logged: a fit that resumes from an
  older checkpoint into the same W&B run would lose those rows, so each logger start opens a
  new W&B run unless ``init_options`` say otherwise (``{"id": ..., "resume": "allow"}``).
* ``wandb`` is imported when the logger starts, not when treadle is. W&B's service process
  may finish writing an offline run's log just after ``finish()`` returns (always before the
  program exits); ``wandb.teardown()`` waits for it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from treadle.components import Logger
from treadle.errors import ConfigError, MissingDependencyError, require
from treadle.hookspecs import hookimpl
from treadle.plugins.loggers.jsonl import to_json_value

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["WandbLogger"]

_MODES = ("offline", "online", "disabled")


def _check_installed() -> None:
    """Fail with the install command if wandb is missing, without importing it (that waits
    for ``start``)."""
    if importlib.util.find_spec("wandb") is None:
        raise MissingDependencyError("the wandb logger", "wandb", "wandb")


class WandbLogger(Logger):
    """Weights & Biases; main process only.

    Options:
        project: the W&B project.
        name: the W&B run's display name (W&B picks one if None).
        mode: ``"offline"``, ``"online"`` or ``"disabled"``; None: ``WANDB_MODE`` if set,
            else ``"offline"``.
        entity, group, tags, notes: passed to ``wandb.init``.
        init_options: any other ``wandb.init`` keyword arguments.
    """

    name: ClassVar[str] = "wandb"

    def __init__(
        self,
        project: str = "treadle",
        name: str | None = None,
        mode: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] | None = None,
        notes: str | None = None,
        init_options: Mapping[str, Any] | None = None,
    ) -> None:
        if mode is not None and mode not in _MODES:
            raise ConfigError(
                f"wandb logger option mode = {mode!r} is not allowed: expected one of "
                f"{', '.join(map(repr, _MODES))}, or None (WANDB_MODE, else 'offline')"
            )
        if not isinstance(project, str) or not project:
            raise ConfigError(
                f"wandb logger option project = {project!r} is not allowed: expected a name"
            )
        if tags is not None and (
            isinstance(tags, str) or not all(isinstance(t, str) for t in tags)
        ):
            raise ConfigError(
                f"wandb logger option tags = {tags!r} is not allowed: expected a list of strings"
            )
        if init_options is not None and not isinstance(init_options, Mapping):
            raise ConfigError(
                f"wandb logger option init_options = {init_options!r} is not allowed: "
                "expected a mapping of wandb.init keyword arguments"
            )
        _check_installed()  # a missing library fails when the run is composed, not later
        self.project = project
        self.display_name = name
        self.mode = mode
        self.entity = entity
        self.group = group
        self.tags = list(tags) if tags is not None else None
        self.notes = notes
        self.init_options = dict(init_options or {})
        self._wandb_run: Any = None
        self._failed = False

    @property
    def wandb_run(self) -> Any:
        """The ``wandb.Run`` while the logger is started, else None."""
        return self._wandb_run

    # ------------------------------------------------------------------ Logger interface

    def start(self, run: Run) -> None:
        """``wandb.init`` with the configuration, in ``<output_dir>``."""
        wandb: Any = require("wandb", extra="wandb", what="the wandb logger")
        output_dir = Path(run.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        mode = self.mode or os.environ.get("WANDB_MODE") or "offline"
        options: dict[str, Any] = {
            "project": self.project,
            "name": self.display_name,
            "mode": mode,
            "dir": str(output_dir),
            "config": to_json_value(run.hparams()),
            "entity": self.entity,
            "group": self.group,
            "tags": self.tags,
            "notes": self.notes,
        }
        options = {k: v for k, v in options.items() if v is not None}
        options.update(self.init_options)
        self._failed = False
        self._wandb_run = wandb.init(**options)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """One W&B row at ``step`` (``step`` itself is the row's key, not a metric)."""
        if self._wandb_run is None:
            return
        values = {k: v for k, v in metrics.items() if k != "step"}
        self._wandb_run.log(values, step=int(step))

    def finish(self) -> None:
        """Finish the W&B run (exit code 1 if the fit failed)."""
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=1 if self._failed else 0)
            self._wandb_run = None

    @hookimpl
    def on_exception(self, run: Run) -> None:
        self._failed = True
        super().on_exception(run)
