"""``mlflow``: params, metric history and artifacts in an MLflow tracking store.

At start the logger creates (or, on resume, reopens) an MLflow run in ``experiment`` and logs
the configuration as params (flattened: ``optimizer/lr``) and as a ``config.json`` artifact;
every ``on_log`` becomes one batched request of metrics at that step; at the end the files
named by ``artifacts`` (default: ``metrics.jsonl``, ``hparams.json`` and ``metrics.csv``, those
that exist) are uploaded and the MLflow run is marked ``FINISHED`` (``FAILED`` after an
exception).

Where runs go, first match wins: the ``tracking_uri`` option; the ``MLFLOW_TRACKING_URI``
environment variable; else a local store inside the run's output directory,
``sqlite:///<output_dir>/mlflow.db`` with artifacts in ``<output_dir>/mlartifacts`` (any local
SQLite store keeps new experiments' artifacts in ``mlartifacts`` beside the database). View it
with ``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db``.

Decisions:

* **The local default is SQLite, not a ``./mlruns`` file store.** MLflow put its file store in
  maintenance mode and, from 3.x, refuses to open one unless ``MLFLOW_ALLOW_FILE_STORE=true``
  is set; SQLite is what MLflow itself now defaults to, and needs no server. A ``file:`` URI
  still works where MLflow allows it.
* **One MLflow run per treadle run, across resumes.** The MLflow run id is saved in every
  checkpoint (plugin state ``"mlflow"``); a resumed fit logs into the same MLflow run, and does
  not log params again (MLflow forbids changing a param, and ``resume`` itself changes).
* Metric names keep treadle's ``/`` (MLflow groups by it); characters MLflow rejects become
  ``_``. Param values longer than MLflow's limit are cut, with ``...`` at the end.
* ``mlflow`` is imported when the logger starts, not when treadle is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from treadle.components import Logger
from treadle.errors import ConfigError, MissingDependencyError, require
from treadle.hookspecs import hookimpl
from treadle.plugins.loggers.jsonl import flatten, to_json_value

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["MlflowLogger"]

_BAD_CHARACTERS = re.compile(r"[^/\w.\- :]")
_PARAM_LIMIT = 6000  # MLflow's MAX_PARAM_VAL_LENGTH
_BATCH_LIMIT = 100  # params per log_batch request (metrics: 1000)


def _metric_name(key: str) -> str:
    return _BAD_CHARACTERS.sub("_", key).strip("/") or "_"


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= _PARAM_LIMIT else text[: _PARAM_LIMIT - 3] + "..."


def _check_installed() -> None:
    """Fail with the install command if mlflow is missing, without importing it (that waits
    for ``start``)."""
    if importlib.util.find_spec("mlflow") is None:
        raise MissingDependencyError("the mlflow logger", "mlflow", "mlflow")


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a local SQLite database (MLflow would put them in ``./mlruns``, in
    whatever the working directory is); elsewhere the store decides."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix) :]).resolve().parent / "mlartifacts").as_uri()


class MlflowLogger(Logger):
    """MLflow tracking; main process only.

    Options:
        tracking_uri: where to log (``http://host:port``, ``sqlite:///path.db``, ...); default
            ``MLFLOW_TRACKING_URI``, else ``sqlite:///<output_dir>/mlflow.db``.
        experiment: the experiment's name (created if missing).
        run_name: the MLflow run's name (MLflow picks one if None).
        tags: tags of the MLflow run.
        artifacts: files to upload at the end, relative to ``run.output_dir`` (missing ones
            are skipped).
    """

    name: ClassVar[str] = "mlflow"

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "treadle",
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        artifacts: Sequence[str] = ("metrics.jsonl", "metrics.csv", "hparams.json"),
    ) -> None:
        for option, value in (("tracking_uri", tracking_uri), ("run_name", run_name)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(
                    f"mlflow logger option {option} = {value!r} is not allowed: expected a "
                    "non-empty string or None"
                )
        if not isinstance(experiment, str) or not experiment:
            raise ConfigError(
                f"mlflow logger option experiment = {experiment!r} is not allowed: expected "
                "an experiment name"
            )
        if tags is not None and not isinstance(tags, Mapping):
            raise ConfigError(
                f"mlflow logger option tags = {tags!r} is not allowed: expected a mapping"
            )
        if isinstance(artifacts, str) or not all(isinstance(a, str) for a in artifacts):
            raise ConfigError(
                f"mlflow logger option artifacts = {artifacts!r} is not allowed: expected a "
                "list of paths relative to the output directory"
            )
        _check_installed()  # a missing library fails when the run is composed, not later
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.artifacts = list(artifacts)
        self._client: Any = None
        self._output_dir: Path | None = None
        self._failed = False
        #: the MLflow run id (kept across fits and, through checkpoints, resumes).
        self.run_id: str | None = None

    # ------------------------------------------------------------------ Logger interface

    def start(self, run: Run) -> None:
        """Connect, open the MLflow run and, for a new one, log the configuration."""
        mlflow: Any = require("mlflow", extra="mlflow", what="the mlflow logger")
        output_dir = Path(run.output_dir).resolve()
        self._output_dir = output_dir
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            output_dir.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{output_dir / 'mlflow.db'}"
        self._client = client = mlflow.MlflowClient(tracking_uri=uri)
        self._failed = False
        if self.run_id is not None:  # a second fit, or a resume: the same MLflow run
            client.update_run(self.run_id, status="RUNNING")
            return
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = _artifact_location(uri)
            experiment_id = client.create_experiment(self.experiment, artifact_location=location)
        created = client.create_run(experiment_id, run_name=self.run_name, tags=self.tags or None)
        self.run_id = created.info.run_id
        from mlflow.entities import Param

        hparams = run.hparams()
        params = [Param(k, _param_value(v)) for k, v in flatten(hparams).items()]
        for i in range(0, len(params), _BATCH_LIMIT):
            client.log_batch(self.run_id, params=params[i : i + _BATCH_LIMIT])
        client.log_dict(self.run_id, to_json_value(hparams), "config.json")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Every metric at ``step``, in one request."""
        if self._client is None or self.run_id is None:
            return
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if key == "step":
                continue
            try:
                batch.append(Metric(_metric_name(key), float(value), timestamp, int(step)))
            except (TypeError, ValueError):
                continue
        for i in range(0, len(batch), 1000):
            self._client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def finish(self) -> None:
        """Upload the artifacts and mark the MLflow run finished (or failed)."""
        if self._client is None or self.run_id is None:
            return
        assert self._output_dir is not None
        for relative in self.artifacts:
            path = self._output_dir / relative
            if path.is_file():
                self._client.log_artifact(self.run_id, str(path))
        self._client.set_terminated(self.run_id, status="FAILED" if self._failed else "FINISHED")
        self._client = None

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_exception(self, run: Run) -> None:
        self._failed = True
        super().on_exception(run)

    @hookimpl
    def on_save_checkpoint(self, run: Run, plugin_state: MutableMapping[str, Any]) -> None:
        if self.run_id is not None and run.is_main_process:
            plugin_state[self.name] = {"run_id": self.run_id}

    @hookimpl
    def on_load_checkpoint(self, plugin_state: Mapping[str, Any]) -> None:
        saved = plugin_state.get(self.name)
        if isinstance(saved, Mapping) and isinstance(saved.get("run_id"), str):
            self.run_id = saved["run_id"]
