"""Each logger's output, read back with the tool's own reader, holds what was logged.

CSV and JSONL are parsed back; TensorBoard events are read with TensorBoard's
``EventAccumulator``; MLflow runs are read with ``MlflowClient`` from a real ``mlflow server``
(SQLite backend, started here) and from the plain file store; a W&B offline run's history is
read from its transaction log. A library that is not installed skips its tests; a missing
library must produce the exact install command.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import toy

import treadle
from treadle.errors import MissingDependencyError
from treadle.plugins.loggers.csv import CsvLogger
from treadle.plugins.loggers.jsonl import JsonlLogger
from treadle.plugins.loggers.mlflow import MlflowLogger
from treadle.plugins.loggers.tensorboard import TensorBoardLogger
from treadle.plugins.loggers.wandb import WandbLogger
from treadle.plugins.metrics import Metrics


class History:
    """Every record every logger received (they all receive the same ``on_log`` mapping)."""

    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []

    @treadle.hookimpl
    def on_log(self, metrics: dict[str, Any]) -> None:
        self.logged.append(dict(metrics))

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(int(m["step"]), float(m[key])) for m in self.logged if key in m]


def fit(tmp_path: Path, loggers: list[Any], **config: Any) -> History:
    torch.manual_seed(0)
    history = History()
    run = treadle.Run(
        toy.model(),
        toy.train_data(n=64, batch_size=8),
        eval_data=toy.train_data(n=16, batch_size=8, seed=3),
        config=treadle.Config(
            **{"max_steps": 6, "log_every": 2, "eval_every": 3, "output_dir": str(tmp_path)}
            | config
        ),
        optimizer={"name": "sgd", "lr": 0.05},
        loggers=loggers,
        checkpoint=None,
        plugins=[history, Metrics({"mae": "mae"})],
    )
    run.fit()
    return history


def _number(text: str) -> float | None:
    return None if text == "" else float(text)


# ------------------------------------------------------------------ CSV and JSONL


def test_csv_and_jsonl_parse_back_equal_to_what_was_logged(tmp_path: Path) -> None:
    history = fit(tmp_path, [CsvLogger(), JsonlLogger()])
    kinds = [(m["step"], "loss" in m) for m in history.logged]
    assert kinds == [(2, True), (3, False), (4, True), (6, True), (6, False)]
    with (tmp_path / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(lines) == len(history.logged)
    for record, row, line in zip(history.logged, rows, lines):
        assert int(row["step"]) == line["step"] == record["step"]
        assert int(row["epoch"]) == line["epoch"] == record["epoch"]
        for key, value in record.items():
            assert _number(row[key]) == value, key  # repr() round-trips floats exactly
            assert line[key] == value, key
        # keys this record lacks are empty cells (the header is the union of every key)
        missing = set(row) - set(record) - {"time"}
        assert all(row[key] == "" for key in missing)
    assert {"loss", "lr", "eval/loss", "eval/mae"} <= set(rows[0])
    with (tmp_path / "hparams.csv").open(newline="") as handle:
        hparams = {row["key"]: json.loads(row["value"]) for row in csv.DictReader(handle)}
    assert hparams["max_steps"] == 6 and hparams["optimizer/name"] == "sgd"


def test_csv_non_finite_values_read_back(tmp_path: Path) -> None:
    class FakeRun:
        output_dir = tmp_path
        is_main_process = True

        @staticmethod
        def hparams() -> dict[str, Any]:
            return {}

    logger = CsvLogger()
    logger.start(FakeRun())  # type: ignore[arg-type]
    logger.log({"step": 1, "a": math.nan, "b": math.inf, "c": -math.inf, "d": 0.1}, step=1)
    logger.log({"step": 2, "e": 1e-300}, step=2)  # a new column widens the file
    logger.finish()
    with (tmp_path / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert math.isnan(float(rows[0]["a"])) and float(rows[0]["b"]) == math.inf
    assert float(rows[0]["c"]) == -math.inf and float(rows[0]["d"]) == 0.1
    assert rows[0]["e"] == "" and float(rows[1]["e"]) == 1e-300


def test_csv_resume_drops_rows_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("step,epoch,time,loss\n1,0,0.0,1.0\n2,0,0.0,0.9\n3,0,0.0,0.8\n4,0,0.0,0.")

    class FakeState:
        step = 2

    class FakeRun:
        output_dir = tmp_path
        is_main_process = True
        state = FakeState()

        @staticmethod
        def hparams() -> dict[str, Any]:
            return {}

    logger = CsvLogger()
    logger.on_fit_begin(FakeRun())  # type: ignore[arg-type]
    logger.log({"step": 3, "epoch": 0, "loss": 0.7}, step=3)
    logger.finish()
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "1.0"), ("2", "0.9"), ("3", "0.7")]


# ------------------------------------------------------------------ TensorBoard


def test_tensorboard_event_files_hold_scalars_hparams_and_text(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (treadle[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = fit(tmp_path, [TensorBoardLogger()])
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    # namespaced as HF and Lightning users expect: train/..., eval/...
    for tag, key in [
        ("train/loss", "loss"),
        ("train/lr", "lr"),
        ("eval/loss", "eval/loss"),
        ("eval/mae", "eval/mae"),
        ("train/epoch", "epoch"),
    ]:
        events = accumulator.Scalars(tag)
        expected = history.series(key)
        assert [(e.step, e.value) for e in events] == [
            (step, pytest.approx(value, rel=1e-6)) for step, value in expected
        ], key
    assert not {"loss", "step", "train/step"} & set(tags["scalars"])
    assert "config/text_summary" in tags["tensors"]
    text = accumulator.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| max_steps | 6 |" in text
    plugin_tags = accumulator.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugin_tags
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(
        plugin_tags["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["max_steps"].number_value == 6
    assert start.hparams["optimizer/name"].string_value == "sgd"


# ------------------------------------------------------------------ MLflow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite backend; its process group is
    stopped afterwards, whatever happens."""
    pytest.importorskip("mlflow", reason="mlflow is not installed (treadle[mlflow])")
    port = _free_port()
    root = tmp_path / "server"
    root.mkdir()
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: uvicorn's workers are stopped with it
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _check_mlflow(uri: str, history: History, logger: MlflowLogger) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert logger.run_id is not None
    stored = client.get_run(logger.run_id)
    assert stored.info.status == "FINISHED"
    params = stored.data.params
    assert params["max_steps"] == "6" and params["optimizer/name"] == "sgd"
    for key in ("loss", "eval/loss", "eval/mae"):
        metric_history = client.get_metric_history(logger.run_id, key)
        got = sorted((m.step, m.value) for m in metric_history)
        assert got == sorted(history.series(key)), key
    artifacts = {a.path for a in client.list_artifacts(logger.run_id)}
    assert {"config.json", "metrics.jsonl", "hparams.json"} <= artifacts


@pytest.mark.slow
def test_mlflow_server_holds_params_and_metric_history(tmp_path: Path, mlflow_server: str) -> None:
    logger = MlflowLogger(tracking_uri=mlflow_server, experiment="served")
    history = fit(tmp_path / "run", [logger, JsonlLogger()])
    _check_mlflow(mlflow_server, history, logger)


def test_mlflow_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow", reason="mlflow is not installed (treadle[mlflow])")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores otherwise
    uri = (tmp_path / "mlruns").as_uri()
    logger = MlflowLogger(tracking_uri=uri)
    history = fit(tmp_path / "run", [logger, JsonlLogger()])
    _check_mlflow(uri, history, logger)


def test_mlflow_default_is_a_local_sqlite_store_in_the_output_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow", reason="mlflow is not installed (treadle[mlflow])")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    logger = MlflowLogger()
    history = fit(tmp_path / "run", [logger, JsonlLogger()])
    _check_mlflow(f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}", history, logger)
    assert (tmp_path / "run" / "mlartifacts").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_mlflow_resume_continues_the_same_mlflow_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow", reason="mlflow is not installed (treadle[mlflow])")
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = "sqlite:///mlflow.db"  # relative: artifacts go beside it, not to ./mlruns

    def run(max_steps: int, logger: MlflowLogger, resume: str | None) -> None:
        torch.manual_seed(0)
        treadle.Run(
            toy.model(), toy.train_data(n=64, batch_size=8),
            config=treadle.Config(max_steps=max_steps, log_every=1, output_dir=str(tmp_path),
                                  resume=resume),
            optimizer={"name": "sgd", "lr": 0.05}, loggers=[logger],
        ).fit()  # fmt: skip

    first = MlflowLogger(tracking_uri=uri)
    run(2, first, None)
    second = MlflowLogger(tracking_uri=uri)
    run(4, second, "auto")
    assert second.run_id == first.run_id
    client = MlflowClient(tracking_uri=uri)
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2, 3, 4]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert (tmp_path / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


# ------------------------------------------------------------------ W&B


def read_wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a ``.wandb`` transaction log (LevelDB's log format, 32 KiB
    blocks, after a 7-byte W&B header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:  # FULL
            payload = chunk
        elif kind == 2:  # FIRST
            pending = chunk
            continue
        elif kind == 3:  # MIDDLE
            pending += chunk
            continue
        elif kind == 4:  # LAST
            payload, pending = pending + chunk, b""
        else:
            break
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


@pytest.fixture
def wandb_offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (treadle[wandb])")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    yield wandb
    wandb.teardown()  # stop the W&B service process this test started


@pytest.mark.slow
def test_wandb_offline_run_directory_holds_the_history(tmp_path: Path, wandb_offline: Any) -> None:
    logger = WandbLogger(project="treadle-test")
    history = fit(tmp_path, [logger])
    wandb_offline.teardown()  # the W&B service writes the log behind finish(): let it end
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # offline by default: nothing was sent anywhere
    rows: dict[int, dict[str, Any]] = {}
    config: dict[str, Any] = {}
    for record in read_wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            rows.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    for key in ("loss", "eval/loss", "eval/mae", "lr"):
        got = [(step, row[key]) for step, row in sorted(rows.items()) if key in row]
        assert got == history.series(key), key
    assert config["max_steps"] == 6 and config["optimizer"]["name"] == "sgd"


# ------------------------------------------------------------------ missing libraries


@pytest.mark.parametrize(
    ("factory", "module", "extra"),
    [
        (TensorBoardLogger, "tensorboard", "tensorboard"),
        (MlflowLogger, "mlflow", "mlflow"),
        (WandbLogger, "wandb", "wandb"),
    ],
)
@pytest.mark.parametrize("when", ["compose", "start"])
def test_missing_library_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factory: Any, module: str, extra: str,
    when: str,
) -> None:  # fmt: skip
    logger = None
    if when == "start":  # installed when the run was composed, gone (or broken) at start
        pytest.importorskip(module, reason=f"{module} is not installed")
        logger = factory()
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(MissingDependencyError) as caught:
        fit(tmp_path, [logger if logger is not None else factory()])
    message = str(caught.value)
    assert f'pip install "treadle[{extra}]" -c constraints.txt' in message
    assert f"the {factory.name} logger needs the optional library {module!r}" in message


def test_loggers_by_name(tmp_path: Path) -> None:
    from treadle import registry

    declared = {e.name for e in registry.installed() if e.kind == "logger"}
    wanted = {"csv", "tensorboard", "mlflow", "wandb"}
    if not wanted <= declared:
        pytest.skip(f"entry points not declared in pyproject.toml yet: {sorted(wanted - declared)}")
    run = treadle.Run(
        toy.model(), loggers=["csv", "tensorboard", "mlflow", "wandb"], checkpoint=None
    )
    assert [type(logger).__name__ for logger in run.loggers] == [
        "CsvLogger", "TensorBoardLogger", "MlflowLogger", "WandbLogger",
    ]  # fmt: skip
