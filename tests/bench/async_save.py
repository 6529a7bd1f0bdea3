"""``python -m tests.bench.async_save``: how long a step is blocked by a save, sync and async.

A model of ``--megabytes`` of float32 weights (default 128 MB: four square linear layers)
trained one AdamW step, so the checkpoint holds weights and two optimizer moments (three
times the model). Rounds alternate a synchronous save (``checkpoint.save(run)``) and a
background one (``checkpoint.save(run, background=True)``); each is timed on the training
thread, which is what a step waits for. The background save's time until it is durable
(``finish_pending``) is reported too. Single-threaded; medians over rounds.

The issue's target: blocked time of the async save <= 25% of the synchronous save's.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import treadle
from treadle import checkpoint


def build(out: Path, megabytes: int) -> treadle.Run:
    width = int(math.sqrt(megabytes * 2**20 / 4 / 4))
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(4)))
    data = [torch.randn(2, width)]
    run = treadle.Run(
        model,
        data,
        loss_fn=lambda output, batch: output.square().mean(),
        config=treadle.Config(
            max_steps=1, output_dir=str(out), save_at_end=False, keep_last=2, log_every=0
        ),
        optimizer={"name": "adamw", "lr": 1e-4},
        loggers=[],
    )
    run.fit()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        run = build(Path(out), args.megabytes)
        size = sum(p.numel() * p.element_size() for p in run.model.parameters()) / 2**20
        sync, blocked, durable = [], [], []
        for round_ in range(args.rounds):
            for mode in ("sync", "async") if round_ % 2 == 0 else ("async", "sync"):
                run.state.step += 1  # a new checkpoint directory each time
                start = time.perf_counter()
                checkpoint.save(run, background=mode == "async")
                returned = time.perf_counter()
                checkpoint.finish_pending(run)
                done = time.perf_counter()
                if mode == "sync":
                    sync.append(returned - start)
                else:
                    blocked.append(returned - start)
                    durable.append(done - start)
    s, b, d = (statistics.median(x) for x in (sync, blocked, durable))
    print(f"model: {size:.0f} MB of weights (checkpoint with AdamW state: {3 * size:.0f} MB)")
    print(f"synchronous save:           {s * 1e3:8.1f} ms (median of {len(sync)})")
    print(f"async save, step blocked:   {b * 1e3:8.1f} ms = {b / s:.1%} of the synchronous save")
    print(f"async save, until durable:  {d * 1e3:8.1f} ms")
    met = "met" if b <= 0.25 * s else "NOT met"
    print(f"target blocked <= 25% of synchronous: {met}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
