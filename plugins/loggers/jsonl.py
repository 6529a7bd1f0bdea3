"""``jsonl``: one JSON object per log call, appended to ``metrics.jsonl`` in the output directory.

Each line is ``{"step": int, "epoch": ..., "time": unix seconds, **metrics}`` and is flushed as
soon as it is written, so ``tail -f`` and a crashed run both see every line logged so far (it is
not fsynced: a power loss may drop the last lines, a process crash does not). The run's
configuration (``run.hparams()``) goes to ``hparams.json`` beside it when the logger starts.

Decisions:

* **Non-finite numbers are written as ``null``.** Python's ``json`` would write ``NaN`` and
  ``Infinity``, which are not JSON and break strict readers (``jq``, JavaScript, pandas with
  ``engine="pyarrow"``); strings such as ``"nan"`` would turn a numeric column into a text one.
  ``null`` keeps the file valid and the column numeric; the cost is that NaN and +/-inf are no
  longer told apart (a diverged loss reads as a missing value). The writer uses
  ``allow_nan=False`` so nothing non-standard can slip through.
* **Append, never truncate**: re-running into the same output directory adds lines. When a
  ``fit()`` resumes from a checkpoint at step N (``run.state.step == N > 0`` at ``on_fit_begin``),
  lines with ``step > N`` are dropped first (they were logged after that checkpoint and the
  resumed run logs those steps again), as are torn lines left by a crash; the file is rewritten
  atomically. This is TensorBoard's ``purge_step``; pass ``rewind_on_resume=False`` to keep
  every line. A standalone ``evaluate()`` never rewrites the file.
* A metric named ``time`` (or ``step``/``epoch``) given by the run wins over the logger's own.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

from treadle.components import Logger
from treadle.errors import ConfigError
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["JsonlLogger", "flatten", "to_json_value"]


def to_json_value(value: Any) -> Any:
    """``value`` as something ``json.dumps(..., allow_nan=False)`` accepts.

    Non-finite floats become ``None``; scalar tensors and numpy numbers become Python numbers;
    containers are converted recursively; anything else unknown becomes its ``str``.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    item = getattr(value, "item", None)  # torch / numpy scalars, without importing either
    if callable(item):
        try:
            return to_json_value(item())
        except (TypeError, ValueError, RuntimeError):  # not a one-element value
            pass
    return str(value)


def flatten(values: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested mappings as one level (``{"optimizer": {"lr": 0.1}}`` → ``{"optimizer/lr": 0.1}``),
    every value made JSON-compatible by :func:`to_json_value`; for loggers that take flat
    hyperparameters (TensorBoard, MLflow).
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}{sep}", sep))
        else:
            flat[name] = to_json_value(value)
    return flat


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(to_json_value(obj), allow_nan=False, ensure_ascii=False, **kwargs)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _step_of(line: str) -> int | None:
    """The ``step`` of a JSONL line; ``None`` for a line that is not a JSON object (torn)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else -1


class FileLogger(Logger):
    """A logger that writes one metrics file (``jsonl``, ``csv``): the ``path`` and
    ``rewind_on_resume`` options, where the file goes, and noting a resumed fit's step so that
    ``start`` can drop what was logged after it.
    """

    #: the metrics file's name in ``run.output_dir`` when ``path`` is not given
    default_file: ClassVar[str]

    def __init__(
        self, path: str | os.PathLike[str] | None = None, rewind_on_resume: bool = True
    ) -> None:
        if path is not None and (not isinstance(path, str | os.PathLike) or not os.fspath(path)):
            raise ConfigError(
                f"{self.name} logger option path = {path!r} is not allowed: expected a file "
                f"path (str or os.PathLike), or None for <output_dir>/{self.default_file}"
            )
        if not isinstance(rewind_on_resume, bool):
            raise ConfigError(
                f"{self.name} logger option rewind_on_resume = {rewind_on_resume!r} is not "
                "allowed: expected True or False"
            )
        self.path = path
        self.rewind_on_resume = rewind_on_resume
        self._file: IO[str] | None = None
        self._resuming_at: int | None = None
        #: where metrics are written; set by ``start``.
        self.metrics_path: Path | None = None

    def _resolve(self, run: Run) -> Path:
        output_dir = Path(run.output_dir)
        if self.path is None:
            return output_dir / self.default_file
        path = Path(self.path).expanduser()
        return path if path.is_absolute() else output_dir / path

    @hookimpl
    def on_fit_begin(self, run: Run) -> None:
        # Only a fit that starts from a restored step rewinds; ``start`` does the work (it runs
        # inside the base hook below, and only on the main process).
        step = run.state.step
        if self.rewind_on_resume and step > 0 and not self._started:
            self._resuming_at = step
        super().on_fit_begin(run)
        self._resuming_at = None


class JsonlLogger(FileLogger):
    """Metrics as JSON Lines, plus ``hparams.json``; main process only.

    Options:
        path: the metrics file; relative paths are taken relative to ``run.output_dir``.
            Default ``run.output_dir / "metrics.jsonl"``.
        rewind_on_resume: when a fit resumes at step N, drop lines with ``step > N`` first.
    """

    name: ClassVar[str] = "jsonl"
    default_file: ClassVar[str] = "metrics.jsonl"

    # ------------------------------------------------------------------ Logger interface

    def start(self, run: Run) -> None:
        """Write ``hparams.json`` and open the metrics file for appending."""
        output_dir = Path(run.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(output_dir / "hparams.json", _dumps(run.hparams(), indent=2) + "\n")

        path = self._resolve(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._resuming_at is not None and path.exists():
            self._rewind(path, self._resuming_at)
        self._resuming_at = None
        self.metrics_path = path
        self._file = path.open("a", encoding="utf-8")
        # A crash can leave a last line without its newline; never glue a record onto it.
        if self._file.tell() > 0 and not _ends_with_newline(path):
            self._file.write("\n")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Append one line and flush it."""
        if self._file is None:  # logged after finish(): nothing open to write to
            return
        epoch = metrics.get("epoch")
        if isinstance(epoch, float) and epoch.is_integer():
            epoch = int(epoch)
        record: dict[str, Any] = {"step": int(step), "epoch": epoch, "time": time.time()}
        record.update((k, v) for k, v in metrics.items() if k not in ("step", "epoch"))
        self._file.write(_dumps(record) + "\n")
        self._file.flush()

    def finish(self) -> None:
        """Close the metrics file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _rewind(path: Path, step: int) -> None:
        """Drop lines logged after ``step`` and torn lines, atomically; no-op if none."""
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            if not line.strip():
                continue
            line_step = _step_of(line)
            if line_step is not None and line_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) != len(lines):
            _write_atomic(path, "".join(kept))


def _ends_with_newline(path: Path) -> bool:
    if path.stat().st_size == 0:
        return True
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"
