"""Crash safety: SIGKILL at any instant, saves included, never loses the run.

A server process (tests/fixtures/ckpt_victim.py) imports torch once and forks one training
child per attempt, so that a trial costs a run rather than an interpreter start. Each trial
kills its run once or twice, either after a random delay or just before a random one of its
file-system operations (fsync, rename, unlink, mkdir, ... — that is, inside saves), then lets
it finish. After every kill, every checkpoint on disk must verify and ``resume="auto"`` must
start from the newest of them; the finished run must have exactly the weights and the losses
of a run that was never killed. All of it twice: with synchronous saves and with background
ones (``Config.save_async``), whose writer thread is killed with the process.

Seeds are printed with every failure; ``TREADLE_CRASH_SEED`` and ``TREADLE_CRASH_TRIALS``
replay or extend the search.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from treadle.checkpoint import verify

FIXTURES = Path(__file__).parent / "fixtures"
STEPS = 6  # two epochs of three steps: checkpoints at epoch ends and in the middle
TRIALS = int(os.environ.get("TREADLE_CRASH_TRIALS", "20"))
SEED = int(os.environ.get("TREADLE_CRASH_SEED", "20240611"))


class Server:
    """The fork server, with a timeout on every answer and no process left behind."""

    def __init__(self, mode: str) -> None:
        self.mode = mode  # "sync" or "async" saves (Config.save_async)
        # The children's output (tracebacks, prints) goes to a file, not a pipe: nobody reads a
        # pipe until the end, and once its buffer filled up a child would block writing.
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115  (closed in close())
        self.process = subprocess.Popen(
            [sys.executable, str(FIXTURES / "ckpt_victim.py"), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.selector = selectors.DefaultSelector()
        assert self.process.stdout is not None
        self.selector.register(self.process.stdout, selectors.EVENT_READ)

    def _readline(self, timeout: float) -> str:
        assert self.process.stdout is not None
        if not self.selector.select(timeout):
            raise AssertionError(f"the victim server did not answer within {timeout} s")
        line = self.process.stdout.readline()
        if not line:
            self.stderr.seek(0)
            stderr = self.stderr.read()
            raise AssertionError(f"the victim server died:\n{stderr[-3000:]}")
        return line

    def run(self, out: Path, *, kill_at: int = 0, delay: float = 0.0) -> tuple[int, float]:
        """One child run; returns its exit code (-9: killed) and how long it took."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"run {out} {kill_at} {delay:.6f} {STEPS} {self.mode}\n")
        self.process.stdin.flush()
        assert self._readline(120).startswith("pid ")
        _, _, code, seconds = self._readline(120).split()
        return int(code), float(seconds)

    def close(self) -> None:
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()  # the server ends after its current child
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()  # its children die with it (PR_SET_PDEATHSIG)
            self.process.wait()
        finally:
            self.selector.close()
            for stream in (self.process.stdout, self.stderr):
                if stream is not None:
                    stream.close()


def complete_checkpoint_step(out: Path, what: str) -> int:
    """Check that every checkpoint on disk is whole; return the newest one's step (0: none)."""
    root = out / "checkpoints"
    steps = sorted(p for p in root.glob("step-*")) if root.is_dir() else []
    for path in steps:
        assert verify(path) == [], f"{what}: {path.name} is damaged: {verify(path)}"
    latest = root / "latest"
    if latest.exists():
        target = root / latest.read_text().strip()
        assert target in steps, f"{what}: latest names {target.name}, which is not there"
    return int(steps[-1].name[5:]) if steps else 0


def losses(out: Path) -> list[tuple[int, float]]:
    path = out / "losses.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_at_random_instants_never_loses_the_run(tmp_path: Path, mode: str) -> None:
    server = Server(mode)
    try:
        reference = tmp_path / "reference"
        code, seconds = server.run(reference)
        assert code == 0
        expected = load_file(reference / "final.safetensors")
        operations = int((reference / "ops.txt").read_text())
        expected_losses = losses(reference)
        assert len(expected_losses) == STEPS and operations > 10 * STEPS

        kills = {"operation": 0, "time": 0}
        for trial in range(TRIALS):
            seed = SEED + trial
            rng = random.Random(seed)
            out = tmp_path / f"trial-{trial:02d}"
            history = [f"trial {trial}, seed {seed} (TREADLE_CRASH_SEED={SEED})"]
            for _ in range(rng.choice((1, 2))):
                if rng.random() < 0.5:
                    kill_at = rng.randint(1, operations)
                    code, _ = server.run(out, kill_at=kill_at)
                    history.append(f"killed before file-system operation {kill_at}: exit {code}")
                    kills["operation"] += code == -9
                else:
                    delay = rng.uniform(0.0, seconds)
                    code, _ = server.run(out, delay=delay)
                    history.append(f"killed after {delay:.4f} s: exit {code}")
                    kills["time"] += code == -9
                assert code in (0, -9), history  # killed, or it had already finished
                newest = complete_checkpoint_step(out, "; ".join(history))
                history.append(f"newest complete checkpoint: step {newest}")

            code, _ = server.run(out)
            assert code == 0, history
            resumed_from = int((out / "resumed.txt").read_text().split()[-1])
            assert resumed_from == newest, history  # resume="auto" took the newest whole one
            actual = load_file(out / "final.safetensors")
            assert actual.keys() == expected.keys(), history
            for key in expected:
                assert torch.equal(actual[key], expected[key]), (key, history)
            # the losses the last run logged continue the reference's exactly
            logged = losses(out)
            tail = logged[len(logged) - (STEPS - resumed_from) :] if resumed_from < STEPS else []
            assert tail == expected_losses[resumed_from:], history
        # both kinds of kill really happened (a kill after the run ended does not count)
        assert kills["operation"] >= 3 and kills["time"] >= 3, kills
    finally:
        server.close()
