"""The pieces: options, selection, label masking, sharding of the micro-batches."""

from __future__ import annotations

import pytest
import torch
from treadle_raft import Schedule
from treadle_raft.batches import IGNORE, collate, micro_batches
from treadle_raft.selection import Scored, reward_stats, select

from treadle import ConfigError


def _scored(j: int, s: int, reward: float) -> Scored:
    return Scored(j, s, (1, j), (s,), reward)


def test_best_per_prompt_and_top_fraction() -> None:
    items = [_scored(j, s, r) for j, s, r in [(1, 0, 0.2), (0, 1, 0.9), (0, 0, 0.9), (1, 1, 0.5)]]
    assert [(i.prompt_index, i.sample) for i in select(items, None, 2)] == [(0, 0), (1, 1)]
    top = select(items, 0.5, 2)  # the two best overall; the tie goes to the earlier sample
    assert [(i.prompt_index, i.sample) for i in top] == [(0, 0), (0, 1)]
    assert reward_stats([1.0, 3.0], "r") == {"r_mean": 2.0, "r_max": 3.0, "r_std": 1.0}


def test_prompt_tokens_and_padding_are_out_of_the_loss() -> None:
    batch = collate([((1, 5), (7, 2)), ((1,), (7, 7, 7, 2))], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 7, 2, 0], [1, 7, 7, 7, 2]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7, 2, IGNORE], [IGNORE, 7, 7, 7, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_ranks_split_each_global_micro_batch() -> None:
    pairs = [((1,), (i, 2)) for i in range(3, 9)]
    common = {"steps": 3, "batch_size": 4, "grad_accum_steps": 2, "seed": 5, "pad_token_id": 0}
    whole = micro_batches(pairs, rank=0, world_size=1, **common)
    parts = [micro_batches(pairs, rank=r, world_size=2, **common) for r in (0, 1)]
    assert len(whole) == len(parts[0]) == 6  # steps x grad_accum_steps
    for i, batch in enumerate(whole):
        joined = torch.cat([parts[0][i]["input_ids"], parts[1][i]["input_ids"]])
        assert torch.equal(joined, batch["input_ids"])
    with pytest.raises(ConfigError, match="multiple of grad_accum_steps"):
        micro_batches(pairs, rank=0, world_size=3, **common)


def test_schedule_counts_and_checks() -> None:
    by_epochs = Schedule(iterations=3, prompts_per_iteration=10, k=4, batch_size=4,
                         epochs_per_iteration=2)  # fmt: skip
    assert (by_epochs.kept, by_epochs.steps, by_epochs.total_steps) == (10, 5, 15)
    top = Schedule(iterations=1, prompts_per_iteration=10, k=4, batch_size=4,
                   steps_per_iteration=1, top_fraction=0.25)  # fmt: skip
    assert top.kept == 10
    with pytest.raises(ConfigError, match="exactly one"):
        Schedule(iterations=1, prompts_per_iteration=1, k=1, batch_size=1,
                 steps_per_iteration=1, epochs_per_iteration=1)  # fmt: skip
    with pytest.raises(ConfigError, match="top_fraction"):
        Schedule(iterations=1, prompts_per_iteration=1, k=1, batch_size=1,
                 steps_per_iteration=1, top_fraction=0)  # fmt: skip
