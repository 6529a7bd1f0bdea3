"""The zoo's child process: one contender on one model, reported as one JSON line.

``python -m tests.bench.zoo_worker '<json spec>'``, started by ``tests.bench.zoo`` with one
thread. Contenders: ``bare`` (forward, ``loss.backward()``, ``opt.step()``, ``zero_grad``),
``treadle`` (``treadle.Run``, no plugin but a loss recorder), ``compiled`` (the same with the
``compile`` plugin, inductor) and ``fp64`` (the bare loop in float64: the accuracy reference).
Every one trains with the dynamo runner's optimizer (``SGD(lr=0.01)``) on the same batches from
the same weights, and keeps each step's loss on the device until the end (no per-step read).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

from tests.bench.worker import MARK, Clock, _usage

LR = 0.01


def _bare(model: Any, batches: list[Any], optimizer: Any, steps: int) -> list[Any]:
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def _treadle(
    model: Any, batches: list[Any], optimizer: Any, steps: int, compiled: bool, workdir: str
) -> tuple[list[Any], dict[str, float]]:
    import treadle

    class LossRecorder:
        """Keeps every step's loss tensor (read once, at the end) and the compile report."""

        name = "zoo-recorder"

        def __init__(self) -> None:
            self.losses: list[Any] = []
            self.logs: dict[str, float] = {}

        @treadle.hookimpl
        def on_step_end(self, loss: Any) -> None:
            self.losses.append(loss.detach())

        @treadle.hookimpl
        def on_log(self, metrics: Any) -> None:
            compiled = {k: float(v) for k, v in metrics.items() if k.startswith("compile/")}
            self.logs.update(compiled)

    recorder = LossRecorder()
    plugins: list[Any] = [recorder]
    if compiled:
        plugins.append({"name": "compile", "backend": "inductor"})
    run = treadle.Run(
        model,
        batches,
        config=treadle.Config(max_steps=steps, output_dir=workdir, log_every=10**9),
        optimizer=optimizer,
        strategy={"name": "single", "device": "cpu"},
        loggers=[],
        checkpoint=None,
        plugins=plugins,
    )
    run.fit()
    return recorder.losses, recorder.logs


def _break_reasons() -> list[str]:
    from torch._dynamo.utils import counters

    return sorted({str(k).strip().splitlines()[0][:160] for k in counters["graph_break"]})


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from tests.bench.zoo_models import MODELS, Size, batches

    zoo_model = MODELS[spec["model"]]
    size = Size(spec["layers"], spec["width"], spec["seq_len"], spec["batch_size"])
    warmup, total = int(spec["warmup"]), int(spec["warmup"]) + int(spec["steps"])
    contender = spec["contender"]
    torch.manual_seed(0)
    model = zoo_model.build(size)
    if contender == "fp64":
        model = model.double()
    model.train()
    data = batches(zoo_model, size)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    clock = Clock(total, warmup)
    optimizer.register_step_post_hook(clock)
    logs: dict[str, float] = {}
    start = time.perf_counter()
    if contender in ("bare", "fp64"):
        losses = _bare(model, data, optimizer, total)
    else:
        with tempfile.TemporaryDirectory(prefix="treadle-zoo-") as workdir:
            losses, logs = _treadle(model, data, optimizer, total, contender == "compiled", workdir)
    if clock.count != total:
        raise RuntimeError(f"{contender} took {clock.count} optimizer steps, expected {total}")
    times = clock.times
    step_times = [b - a for a, b in zip(times[warmup - 1 :], times[warmup:])]
    return {
        "losses": [float(loss) for loss in losses],
        "step_times_s": step_times,
        "measured_s": times[-1] - times[warmup - 1],
        "warmup_s": times[warmup - 1] - start,
        "compile": logs,
        "break_reasons": _break_reasons() if contender == "compiled" else [],
        "load_before": os.getloadavg(),
        **_usage(),
    }


def main(argv: list[str]) -> int:
    result = run(json.loads(argv[0]))
    sys.stdout.flush()
    print(MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
