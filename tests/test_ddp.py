"""``ddp``: options, the conformance kit on two gloo processes, and the process group's life."""

from __future__ import annotations

import functools
from pathlib import Path

import dist_workers
import pytest
import torch

from treadle import ConfigError, registry, testing
from treadle.plugins.strategies.ddp import DDPStrategy


@pytest.mark.multiprocess
class TestDDPConformance(testing.StrategyConformance):
    strategy = functools.partial(DDPStrategy, device="cpu")


def test_options_are_checked_when_composed() -> None:
    with pytest.raises(ConfigError, match="bucket_cap_mb"):
        DDPStrategy(device="cpu", bucket_cap_mb=-1)
    with pytest.raises(ConfigError, match="static_graph"):
        DDPStrategy(device="cpu", static_graph="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="timeout"):
        DDPStrategy(device="cpu", timeout=0)
    strategy = DDPStrategy(device="cpu", bucket_cap_mb=10, static_graph=True)
    assert strategy.ddp_options["bucket_cap_mb"] == 10
    assert strategy.ddp_options["static_graph"] is True
    assert strategy.device == torch.device("cpu")


def test_rank_comes_from_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    strategy = DDPStrategy(device="cpu")
    assert (strategy.rank, strategy.world_size, strategy.local_rank) == (1, 2, 1)
    assert not strategy.is_main_process


@pytest.mark.multiprocess
def test_collectives_on_two_processes() -> None:
    results = testing.run_distributed(dist_workers.collectives, world_size=2)
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world_size"] == 2
        assert result["agree"] == 1 | 2 | 8  # the OR of both ranks' request bits
        assert result["agree_none"] == 0
        assert result["mean"] == [0.5]
        assert result["sum"] == [3.0]
        assert result["max"] == [1.0] and result["min"] == [0.0]
        assert result["int_mean"] == [1.5]
        assert result["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert result["group_kept"] is True


@pytest.mark.multiprocess
def test_strategy_makes_and_destroys_its_own_group(tmp_path: Path) -> None:
    results = testing.run_distributed(
        dist_workers.own_group, "ddp", str(tmp_path), world_size=2, init_process_group=False
    )
    assert [r["backend"] for r in results] == ["gloo", "gloo"]
    assert [r["initialized_after_close"] for r in results] == [False, False]
    assert [r["future_warnings"] for r in results] == [[], []]  # e.g. torch's broadcast_buffers
    assert results[0]["weights"]


@pytest.mark.multiprocess
def test_parity_check_catches_a_strategy_that_does_not_shard_data() -> None:
    with pytest.raises(AssertionError, match="differs"):
        testing.check_loss_parity(dist_workers.unsharded_ddp)


@pytest.mark.multiprocess
def test_no_sync_check_catches_a_strategy_that_always_synchronises() -> None:
    with pytest.raises(AssertionError, match="synchronised"):
        testing.check_no_sync(dist_workers.always_sync_ddp)


def test_found_by_name() -> None:
    if "ddp" not in registry.entries("strategy"):
        pytest.skip("the 'ddp' entry point is not declared in pyproject.toml yet")
    assert registry.load("strategy", "ddp") is DDPStrategy
