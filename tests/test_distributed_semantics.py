"""What being distributed means for a run: sharded and reshuffled data, the global batch,
metrics reduced over ranks, and decisions every rank takes alike (the stop and save checks
are in the conformance kit, run by tests/test_ddp.py and tests/test_fsdp.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dist_workers
import pytest
from torch.utils.data import DataLoader

import treadle
from treadle import testing
from treadle.plugins.strategies.ddp import DDPStrategy


def _strategy(monkeypatch: pytest.MonkeyPatch, rank: int, world_size: int) -> DDPStrategy:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    return DDPStrategy(device="cpu")


def test_each_rank_reads_its_own_shard_reshuffled_every_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    samplers = [
        _strategy(monkeypatch, rank, 2).train_sampler(64, shuffle=True, seed=3, drop_last=False)
        for rank in range(2)
    ]
    shards = [list(s) for s in samplers]
    assert len(shards[0]) == len(shards[1]) == 32
    assert sorted(shards[0] + shards[1]) == list(range(64))  # disjoint, and nothing missed
    assert shards == [list(s) for s in samplers]  # the same epoch is the same order
    for sampler in samplers:
        sampler.set_epoch(1)
    reshuffled = [list(s) for s in samplers]
    assert reshuffled != shards
    assert sorted(reshuffled[0] + reshuffled[1]) == list(range(64))


def _run(strategy: DDPStrategy, tmp_path: Path, batch_size: int = 4) -> treadle.Run:
    return treadle.Run(
        testing.TinyModel(),
        train_data=DataLoader(testing.tiny_data(), batch_size=batch_size, shuffle=True),
        config=treadle.Config(grad_accum_steps=3, output_dir=str(tmp_path)),
        strategy=strategy,
        loggers=[],
    )


def test_the_global_batch_is_printed_by_the_main_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    main = _strategy(monkeypatch, 0, 2)
    main.on_fit_begin(_run(main, tmp_path))
    printed = capsys.readouterr().err
    assert "global batch 24 = 2 process(es) on cpu x per-device batch 4 x 3 accumulation" in printed
    other = _strategy(monkeypatch, 1, 2)
    other.on_fit_begin(_run(other, tmp_path))
    assert capsys.readouterr().err == ""


@pytest.mark.multiprocess
def test_logged_losses_are_means_over_ranks(tmp_path: Path) -> None:
    results = testing.run_distributed(
        dist_workers.metrics_across_ranks, str(tmp_path), world_size=2
    )
    local = [r["local"] for r in results]
    assert local[0] != local[1]  # the ranks saw different data
    for result in results:
        means = [(a + b) / 2 for a, b in zip(*local)]
        assert result["train"] == pytest.approx(means, rel=1e-6)
        # evaluation is sharded too, and reduced over every row of the eval set
        assert result["eval"] == pytest.approx([result["full_eval"]], rel=1e-5)
    assert results[0]["train"] == results[1]["train"]
    assert results[0]["eval"] == results[1]["eval"]


class _Records:
    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    @treadle.hookimpl
    def on_log(self, metrics: dict[str, float]) -> None:
        self.logged.append(dict(metrics))


def uneven_batches_throughput(output_dir: str) -> list[dict[str, float]]:
    """A two-process worker: rank 0 trains on batches of 2 rows, rank 1 on batches of 6 (each
    its own list of batches, which treadle does not shard); 4 steps, a log every 2."""
    import toy

    rank = int(os.environ["RANK"])
    treadle.seed_everything(0)
    records = _Records()
    run = treadle.Run(
        toy.model(),
        train_data=toy.train_data(n=48, batch_size=2 if rank == 0 else 6),
        config=treadle.Config(max_steps=4, log_every=2, output_dir=output_dir, save_at_end=False),
        strategy=DDPStrategy(device="cpu"),
        plugins=[records],
        loggers=[],
    )
    with run:
        run.fit()
    return [m for m in records.logged if "loss" in m]


@pytest.mark.multiprocess
def test_logged_samples_per_s_counts_every_ranks_samples(tmp_path: Path) -> None:
    results = testing.run_distributed(uneven_batches_throughput, str(tmp_path), world_size=2)
    for records in results:
        assert [r["step"] for r in records] == [2, 4]
        for record in records:
            # rate x time per step x steps = the samples of the interval: 2 steps x (2 + 6)
            # rows, on either rank (this rank's alone would be 4 or 12; its count x world 8 or 24)
            samples = record["samples_per_s"] * record["step_time_s"] * 2
            assert samples == pytest.approx(16.0, rel=1e-9)


# ------------------------------------------------------------------ the harness cleans up


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has finished; only its exit status is left


def _pids(directory: Path, count: int) -> list[int]:
    files = sorted(directory.glob("pids-*"))
    assert len(files) == count, f"only {len(files)} ranks started"
    return [int(pid) for file in files for pid in file.read_text().split()]


def _wait_dead(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


@pytest.mark.multiprocess
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_hanging_rank_is_killed_at_the_timeout_with_its_children(tmp_path: Path) -> None:
    with pytest.raises(testing.WorkerFailed, match="timed out"):
        testing.run_distributed(
            dist_workers.hang_with_child,
            str(tmp_path),
            world_size=2,
            timeout=10,
            init_process_group=False,  # starts sooner
        )
    assert _wait_dead(_pids(tmp_path, 2)) == []


@pytest.mark.multiprocess
def test_a_failing_rank_fails_the_call_with_its_traceback() -> None:
    with pytest.raises(testing.WorkerFailed) as failure:
        testing.run_distributed(dist_workers.fail_on_rank_one, world_size=2, timeout=120)
    assert "rank 1 exited with code 1" in str(failure.value)  # rank 0 may fail too, in barrier
    assert "ValueError: rank one gives up" in str(failure.value)


@pytest.mark.multiprocess
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_ranks_die_with_the_process_that_started_them(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, dist_workers.__file__, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("pids-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = _pids(tmp_path, 2)
    finally:
        parent.kill()
        parent.wait()
    # the ranks' watchdogs notice that their parent is gone and kill their process groups
    assert _wait_dead(pids) == []
