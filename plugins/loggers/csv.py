"""``csv``: one row per log call in ``metrics.csv``, for spreadsheets and ``pandas.read_csv``.

The columns are ``step``, ``epoch``, ``time`` (unix seconds), then every metric in the order it
was first logged; a cell is empty where a row's record lacked the metric (an evaluation row has
no training loss). The configuration (``run.hparams()``, flattened) goes to ``hparams.csv``
beside it (``key,value`` rows, values as JSON).

Decisions:

* **A new metric widens the file.** CSV has one header, and which metrics exist is known only
  as they arrive (evaluation metrics first appear at the first evaluation), so the first record
  with a new key rewrites the file (through a temporary file and a rename) with the wider
  header; every other record is one appended, flushed row. Rewrites happen a handful of times
  per run, not per step.
* Numbers are written with ``repr``, which reads back to the same float; NaN and infinities
  are written ``nan``, ``inf``, ``-inf``, which ``float()`` and ``pandas.read_csv`` parse.
* Like ``jsonl``: append, never truncate; when a ``fit()`` resumes from a checkpoint at step N,
  rows with ``step > N`` and torn rows are dropped first (``rewind_on_resume=False`` keeps them).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from treadle.plugins.loggers.jsonl import FileLogger, _ends_with_newline, _write_atomic, flatten

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["CsvLogger"]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    item = getattr(value, "item", None)  # torch / numpy scalars
    if callable(item) and not isinstance(value, int | str):
        try:
            return _cell(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def _rows_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


class CsvLogger(FileLogger):
    """Metrics as CSV rows, plus ``hparams.csv``; main process only.

    Options:
        path: the metrics file; relative paths are taken relative to ``run.output_dir``.
            Default ``run.output_dir / "metrics.csv"``.
        rewind_on_resume: when a fit resumes at step N, drop rows with ``step > N`` first.
    """

    name: ClassVar[str] = "csv"
    default_file: ClassVar[str] = "metrics.csv"

    def __init__(
        self, path: str | os.PathLike[str] | None = None, rewind_on_resume: bool = True
    ) -> None:
        super().__init__(path, rewind_on_resume)
        self._writer: Any = None
        self._columns: list[str] = []

    # ------------------------------------------------------------------ Logger interface

    def start(self, run: Run) -> None:
        """Write ``hparams.csv``; open the metrics file, rewinding it on resume."""
        output_dir = Path(run.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        rows = [["key", "value"]] + [
            [key, json.dumps(value, allow_nan=False)]
            for key, value in flatten(run.hparams()).items()
        ]
        _write_atomic(output_dir / "hparams.csv", _rows_text(rows))

        path = self._resolve(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self._read(path)
        header, body = (rows[0], rows[1:]) if rows else ([], [])
        keep = [row for row in body if len(row) == len(header)]  # a crash can tear the last row
        if self._resuming_at is not None:
            keep = [row for row in keep if _step(row) <= self._resuming_at]
        self._resuming_at = None
        if len(keep) != len(body) or (path.exists() and not _ends_with_newline(path)):
            _write_atomic(path, _rows_text([header, *keep]) if header else "")
        self._columns = header
        self.metrics_path = path
        self._open()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Append one row (widening the file first if a metric is new) and flush it."""
        if self._file is None:
            return
        record: dict[str, Any] = {
            "step": int(step),
            "epoch": metrics.get("epoch"),
            "time": time.time(),
        }
        record.update((k, v) for k, v in metrics.items() if k not in ("step", "epoch"))
        new = [key for key in record if key not in self._columns]
        if new:
            self._widen(new)
        epoch = record["epoch"]
        if isinstance(epoch, float) and epoch.is_integer():
            record["epoch"] = int(epoch)
        self._writer.writerow([_cell(record.get(column)) for column in self._columns])
        self._file.flush()

    def finish(self) -> None:
        """Close the metrics file."""
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None

    # ------------------------------------------------------------------ internals

    def _open(self) -> None:
        assert self.metrics_path is not None
        self._file = self.metrics_path.open("a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")

    @staticmethod
    def _read(path: Path) -> list[list[str]]:
        if not path.exists():
            return []
        with path.open(encoding="utf-8", newline="") as handle:
            return [row for row in csv.reader(handle) if row]

    def _widen(self, new: list[str]) -> None:
        """Rewrite the file with ``new`` columns appended to the header (rows padded)."""
        assert self._file is not None and self.metrics_path is not None
        self._file.close()
        rows = self._read(self.metrics_path)
        body = rows[1:] if rows else []
        self._columns = [*self._columns, *new]
        padding = [""] * len(new)
        _write_atomic(self.metrics_path, _rows_text([self._columns, *(r + padding for r in body)]))
        self._open()


def _step(row: list[str]) -> int:
    try:
        return int(row[0])
    except (ValueError, IndexError):
        return -1
