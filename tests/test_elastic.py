"""Elastic restarts: ``torchrun --max-restarts 1`` with ``resume="auto"`` finishes a 2-process run
whose rank was SIGKILLed mid-run with the uninterrupted run's weights, bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from treadle import testing

WORKER = Path(__file__).parent / "fixtures" / "elastic_worker.py"
FINAL = "checkpoints/step-000008/model.safetensors"  # elastic_worker.MAX_STEPS


def _torchrun(tmp_path: Path, output: str, kill_rank: int, kill_step: int) -> str:
    """torchrun with a c10d rendezvous on 127.0.0.1 (as on several nodes), one restart allowed."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--max-restarts", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{testing.free_port()}", "--local-addr", "127.0.0.1",
            "--monitor-interval", "0.5",
            str(WORKER), str(tmp_path / output), str(kill_rank), str(kill_step)]  # fmt: skip
    env = {"CUDA_VISIBLE_DEVICES": "", "GLOO_SOCKET_IFNAME": "lo"}  # loopback only
    result = testing.run_isolated(argv, timeout=240, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-6000:]
    return result.stdout


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kill_rank", [0, 1])
def test_a_sigkilled_rank_is_restarted_and_the_run_ends_with_the_uninterrupted_weights(
    tmp_path: Path, kill_rank: int
) -> None:
    _torchrun(tmp_path, "whole", kill_rank=-1, kill_step=0)
    output = _torchrun(tmp_path, "killed", kill_rank=kill_rank, kill_step=5)
    # the first attempt died at step 5 (after the save of step 4); the restart resumed there
    for rank in (0, 1):
        attempts = (tmp_path / "killed" / f"attempts-rank{rank}.txt").read_text().splitlines()
        assert attempts == ["restart 0 began at step 0", "restart 1 began at step 4"], output
    if kill_rank == 0:  # the main process held the output lock: the restart takes it over
        assert "taking over the lock" in output, output[-6000:]
    whole, resumed = load_file(tmp_path / "whole" / FINAL), load_file(tmp_path / "killed" / FINAL)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert whole[name].equal(resumed[name]), name
