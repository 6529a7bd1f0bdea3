"""Predictions and evaluation outputs gathered across ranks, in the data set's order, unpadded.

Two ways: an in-process fake world of two ranks (threads exchanging objects), and a real
two-process gloo run with the ``ddp`` strategy. Either must reproduce the single-process
``predict()`` exactly, also when the data set's length is not a multiple of the world size.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import toy
from torch import nn
from torch.utils.data import DataLoader

import treadle
from treadle.errors import TreadleWarning
from treadle.plugins.strategies._gather import ShardedEvaluation, interleave_order
from treadle.plugins.strategies.single import SingleDevice

FIXTURES = Path(__file__).parent / "fixtures"


class Elementwise(nn.Module):
    """Per-sample outputs from element-wise operations only, so that every row's value is the
    same whatever the batch it is computed in (a matrix product may round differently)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.tanh(x * self.scale)
        prediction = hidden.sum(dim=1)
        return {
            "loss": (prediction - y).square().mean(),
            "prediction": prediction,
            "hidden": hidden,
        }


def _single_process(data: Any, predict_step: Any = None) -> list[Any]:
    torch.manual_seed(0)
    plugins = [predict_step] if predict_step is not None else []
    run = treadle.Run(
        Elementwise(), strategy=SingleDevice("cpu"), loggers=[], checkpoint=None, plugins=plugins
    )
    return run.predict(data)


def _per_sample(run: treadle.Run, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    out = model(**batch)
    return {"prediction": out["prediction"], "hidden": out["hidden"], "x": batch["x"]}


class PerSample:
    """predict_step returning per-sample values only (the model's output includes a batch loss)."""

    @treadle.hookimpl
    def predict_step(self, run: treadle.Run, model: nn.Module, batch: Any) -> Any:
        return _per_sample(run, model, batch)


def assert_same_batches(actual: list[Any], expected: list[Any]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key


# ------------------------------------------------------------------ the pure reordering


def test_interleave_order_restores_positions_and_drops_padding() -> None:
    # 5 samples on 2 ranks: rank 0 has positions 0, 2, 4; rank 1 has 1, 3 and a padded 5th
    assert interleave_order([3, 3], 5) == [0, 3, 1, 4, 2]
    # divisible: nothing dropped
    assert interleave_order([2, 2], 4) == [0, 2, 1, 3]
    # 3 ranks, 7 samples: two padded positions (7, 8) on ranks 1 and 2
    assert interleave_order([3, 3, 3], 7) == [0, 3, 6, 1, 4, 7, 2]
    # a loader that dropped its last incomplete batch produced fewer rows: nothing invented
    assert interleave_order([2, 1], 5) == [0, 2, 1]


# ------------------------------------------------------------------ a fake world of two threads


class _Exchange:
    def __init__(self, world: int) -> None:
        self.slots: list[Any] = [None] * world
        self.barrier = threading.Barrier(world, timeout=60)


class ThreadRank(ShardedEvaluation):
    """A rank of an in-process world: collectives exchange objects between threads; the
    sampler's padding is cut and outputs are gathered as every multi-process strategy does."""

    name = "thread-rank"

    def __init__(self, rank: int, world: int, exchange: _Exchange) -> None:
        self.rank, self.world_size, self.exchange = rank, world, exchange

    def all_gather_object(self, obj: Any) -> list[Any]:
        self.exchange.slots[self.rank] = obj
        self.exchange.barrier.wait()
        gathered = list(self.exchange.slots)
        self.exchange.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return gathered

    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        values = torch.stack(self.all_gather_object(tensor.detach().cpu().clone()))
        reduced = {"sum": values.sum(0), "mean": values.mean(0), "max": values.amax(0)}[op]
        return reduced.to(tensor.dtype)

    def agree(self, requests: int) -> int:
        result = 0
        for value in self.all_gather_object(requests):
            result |= value
        return result


def run_ranks(world: int, body: Callable[[treadle.Run], Any], **run_options: Any) -> list[Any]:
    """``body(run)`` on ``world`` threads, each a rank with its own ``Run``; results by rank."""
    exchange = _Exchange(world)
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            torch.manual_seed(0)
            run = treadle.Run(
                Elementwise(),
                strategy=ThreadRank(rank, world, exchange),
                loggers=[],
                checkpoint=None,
                **run_options,
            )
            results[rank] = body(run)
        except BaseException as exc:
            errors.append(exc)
            exchange.barrier.abort()  # release the other rank instead of letting it wait

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("length", [13, 12, 1])
def test_fake_two_ranks_predict_equals_single_process(length: int) -> None:
    dataset = toy.dataset(n=length)
    expected = _single_process(DataLoader(dataset, batch_size=4), PerSample())
    results = run_ranks(
        2, lambda run: run.predict(DataLoader(dataset, batch_size=4)), plugins=[PerSample()]
    )
    for predictions in results:  # every rank receives the whole, ordered result
        assert_same_batches(predictions, expected)


def test_fake_two_ranks_compute_metrics_sees_each_sample_once_in_order() -> None:
    dataset = toy.dataset(n=13)
    seen: dict[int, Any] = {}

    class Capture:
        @treadle.hookimpl
        def compute_metrics(self, run: treadle.Run, predictions: Any, labels: Any) -> Any:
            seen[run.strategy.rank] = (predictions, labels)
            return {"rows": len(labels)}

    results = run_ranks(
        2,
        lambda run: run.evaluate(DataLoader(dataset, batch_size=4)),
        config=treadle.Config(batch_size=4),
        plugins=[Capture()],
    )
    torch.manual_seed(0)
    reference = Elementwise()
    with torch.no_grad():
        expected = reference(dataset.x, dataset.y)["prediction"]
    for rank in (0, 1):
        predictions, labels = seen[rank]
        assert torch.equal(predictions, expected)
        assert torch.equal(labels, dataset.y)
        assert results[rank]["eval/rows"] == 13


def test_batch_level_values_are_dropped_with_a_warning_when_gathering() -> None:
    dataset = toy.dataset(n=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_ranks(2, lambda run: run.predict(DataLoader(dataset, batch_size=2)))
    assert set(results[0][0]) == {"prediction", "hidden"}  # the batch's mean loss is gone
    messages = [str(w.message) for w in caught if issubclass(w.category, TreadleWarning)]
    assert any("dropped" in m and "loss" in m for m in messages)


def test_a_loader_treadle_did_not_shard_keeps_each_ranks_own_outputs() -> None:
    batches = toy.train_data(n=8, batch_size=4)  # a plain list: every rank sees all of it
    results = run_ranks(2, lambda run: run.predict(batches), plugins=[PerSample()])
    expected = _single_process(batches, PerSample())
    for predictions in results:
        assert_same_batches(predictions, expected)


# ------------------------------------------------------------------ a real two-process gloo run

SCRIPT = """
import os, sys
sys.path.insert(0, {fixtures!r})
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from torch.utils.data import DataLoader
import toy, treadle
from treadle.plugins.strategies.ddp import DDPStrategy
from treadle.plugins.metrics import Mean, Metrics
from test_predict_distributed import Elementwise, PerSample

out = {out!r}
rank = int(os.environ["RANK"])
dataset = toy.dataset(n={length})
seen = {{}}

class Capture:
    @treadle.hookimpl
    def compute_metrics(self, predictions, labels):
        seen["eval_predictions"], seen["eval_labels"] = predictions, labels
        return {{"rows": len(labels)}}

torch.manual_seed(0)
run = treadle.Run(
    Elementwise(),
    strategy=DDPStrategy(backend="gloo", device="cpu", timeout=60),
    loggers=[], checkpoint=None,
    plugins=[PerSample(), Capture(), Metrics({{"sum_y": Mean()}}, adapter=lambda o, b: (b["y"],))],
)
predictions = run.predict(DataLoader(dataset, batch_size=4))
metrics = run.evaluate(DataLoader(dataset, batch_size=4))
torch.save({{"predictions": predictions, "metrics": metrics, **seen}}, f"{{out}}/rank{{rank}}.pt")
run.close()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.multiprocess
@pytest.mark.parametrize("length", [13, 12])
def test_two_process_gloo_predict_equals_single_process(tmp_path: Path, length: int) -> None:
    pytest.importorskip("treadle.plugins.strategies.ddp", reason="the ddp strategy is not here")
    script = tmp_path / "worker.py"
    values = {"fixtures": str(FIXTURES), "tests": str(Path(__file__).parent)}
    source = textwrap.dedent(SCRIPT).format(out=str(tmp_path), length=length, **values)
    script.write_text(source)
    port = _free_port()
    processes = []
    try:
        for rank in range(2):
            env = {
                **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }  # fmt: skip
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(script)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = [p.communicate(timeout=180)[0] for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output

    dataset = toy.dataset(n=length)
    expected = _single_process(DataLoader(dataset, batch_size=4), PerSample())
    torch.manual_seed(0)
    with torch.no_grad():
        expected_predictions = Elementwise()(dataset.x, dataset.y)["prediction"]
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert_same_batches(result["predictions"], expected)
        assert torch.equal(result["predictions"][-1]["x"], dataset.x[(length - 1) // 4 * 4 :])
        # compute_metrics saw every sample once, in order, on every rank
        assert torch.equal(result["eval_predictions"], expected_predictions)
        assert torch.equal(result["eval_labels"], dataset.y)
        assert result["metrics"]["eval/rows"] == length
        # streaming metrics are synchronised across ranks and see each sample once: the
        # sampler's padding is cut off before the batch reaches eval_step and the hooks
        assert result["metrics"]["eval/sum_y"] == pytest.approx(float(dataset.y.mean()))
