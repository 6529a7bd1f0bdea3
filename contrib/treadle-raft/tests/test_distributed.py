"""Two processes (DDP over gloo) against one: prompts are sharded, each rank samples its share,
the kept samples are gathered, and every rank trains on its part of the same global batches.

What is compared: each prompt is sampled with its own seed, so both runs sample the same
responses and keep the same pairs (asserted exactly, as are the logged reward statistics); the
2 ranks split every global micro-batch in halves and the loss is normalised over all response
tokens of all ranks, so the weights agree with the one-process run's up to the order of float
sums (asserted with a tolerance).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import workers

from treadle import testing


@pytest.mark.timeout(240)
def test_two_processes_match_one(tmp_path: Path) -> None:
    reference = workers.raft_result(str(tmp_path / "one"), 1)
    ranks = testing.run_distributed(
        workers.raft_result, str(tmp_path / "two"), 2, world_size=2, timeout=200
    )
    assert reference["sampled_here"] == 4
    assert [r["sampled_here"] for r in ranks] == [2, 2]  # the prompts were sharded
    for result in ranks:
        assert result["step"] == reference["step"] == 4
        assert result["kept"] == reference["kept"]
        assert result["history"] == reference["history"]
        for name, expected in reference["weights"].items():
            torch.testing.assert_close(result["weights"][name], expected, rtol=1e-4, atol=1e-5)
    for name, weight in ranks[0]["weights"].items():  # DDP keeps the ranks identical
        assert torch.equal(weight, ranks[1]["weights"][name]), name
