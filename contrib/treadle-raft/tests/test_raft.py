"""The RAFT loop end to end: reward rises, one optimizer and one schedule over all iterations,
bit-for-bit resume after a kill in the third iteration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_raft, small_run
from treadle_raft import example

import treadle

#: The shortened example (5 iterations, seed 0) must raise the mean reward of the sampled
#: responses by at least this much from the first iteration to the last (it measured 0.10 →
#: about 0.4; the reward is a share in [0, 1]).
REWARD_MARGIN = 0.15


@pytest.mark.timeout(120)
def test_example_raises_the_mean_reward() -> None:
    history = example.main(iterations=5, seed=0, pretrain_steps=40, verbose=False)
    assert len(history) == 5
    first, last = history[0]["raft/reward_mean"], history[-1]["raft/reward_mean"]
    assert last > first + REWARD_MARGIN, [m["raft/reward_mean"] for m in history]
    for metrics in history:  # the kept ones are the best: never worse on average
        assert metrics["raft/kept_reward_mean"] >= metrics["raft/reward_mean"]
        assert metrics["raft/kept"] == 8


class _Optimizers:
    """Records the run's optimizer at the start of every fit."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    @treadle.hookimpl
    def on_fit_begin(self, run: treadle.Run) -> None:
        self.seen.append(run.optimizer)


@pytest.mark.timeout(120)
def test_one_optimizer_and_one_schedule_over_all_iterations(tmp_path: Path) -> None:
    raft, recorder = small_raft(iterations=3, steps=2), _Optimizers()
    run = small_run(str(tmp_path), raft)
    run.add_plugin(recorder)
    state = raft.fit(run)
    assert len(recorder.seen) == 3  # one run.fit per iteration
    assert all(optimizer is recorder.seen[0] for optimizer in recorder.seen)
    assert state.step == 6 and state.epoch == 3
    assert run.total_steps == 6  # the scheduler was built for every iteration's steps
    assert run.scheduler.last_epoch == 6
    assert run.scheduler.get_last_lr()[0] == pytest.approx(0.0)  # linear decay ends at 0
    steps = {int(s["step"]) for s in run.optimizer.state.values()}
    assert steps == {6}  # AdamW's own count: the sum over the iterations
    assert [m["raft/iteration"] for m in raft.history] == [0.0, 1.0, 2.0]
    assert [m["raft/kept"] for m in raft.history] == [4.0, 4.0, 4.0]


class Killed(BaseException):
    """A kill: no emergency checkpoint (that is for ``Exception``), nothing after it runs."""


class _KillAtStep:
    def __init__(self, step: int) -> None:
        self.step = step

    @treadle.hookimpl
    def on_step_end(self, run: treadle.Run) -> None:
        if run.state.step == self.step:
            raise Killed(f"killed at step {self.step}")


def _weights(run: treadle.Run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def _reward_killer(calls: int) -> Any:
    """The toy reward, which kills the process on its ``calls``-th call."""
    count = 0

    def reward(prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        nonlocal count
        count += 1
        if count == calls:
            raise Killed("killed while scoring")
        return example.target_share(prompts, responses)

    return reward


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[Any]]:
    raft = small_raft(iterations=4, steps=4)
    run = small_run(str(tmp_path_factory.mktemp("whole")), raft, dropout=0.1, save_every=2)
    raft.fit(run)
    return _weights(run), raft.history


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["sampling", "mid-iteration"])
def test_killed_in_the_third_iteration_resumes_bit_for_bit(
    tmp_path: Path, uninterrupted: tuple[dict[str, Any], list[Any]], where: str
) -> None:
    expected, expected_history = uninterrupted
    if where == "sampling":  # after iteration 2's checkpoint, while scoring iteration 3
        raft = small_raft(iterations=4, steps=4)
        raft.reward_fn = _reward_killer(3)
        run = small_run(str(tmp_path), raft, dropout=0.1, save_every=2)
    else:  # iteration 3 is steps 9-12: the checkpoint of step 10 holds its kept pairs
        raft = small_raft(iterations=4, steps=4)
        run = small_run(str(tmp_path), raft, dropout=0.1, save_every=2)
        run.add_plugin(_KillAtStep(11))
    with pytest.raises(Killed):
        raft.fit(run)
    assert run.state.epoch == 2  # in the third iteration

    resumed_raft = small_raft(iterations=4, steps=4)
    resumed = small_run(str(tmp_path), resumed_raft, dropout=0.1, save_every=2, resume="auto")
    resumed_raft.fit(resumed)
    assert resumed.state.step == 16
    got = _weights(resumed)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    # a mid-iteration resume reuses the kept pairs in the checkpoint instead of sampling again
    first = 2 if where == "sampling" else 3
    assert resumed_raft.history == expected_history[first:]
