"""Where a contender's step time goes, beyond the bare loop's: the profile behind the targets.

``python -m tests.bench.profile`` runs one contender (default: treadle without plugins on the
MLP) in this process under cProfile and prints the kernel's and plugins' own functions, per
step. ``--instructions`` instead counts the CPU instructions per step of the contender and of
the bare loop under valgrind's callgrind (started and stopped around the measured steps): a
count does not depend on the machine's load, so it shows a change of a few microseconds per
step on a shared machine where timings cannot. Needs ``valgrind`` on the PATH; about a minute.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OWN = re.compile(r"[/\\](core|plugins)[/\\]")  # treadle's files, editable or installed alike


def _context(workload: str, steps: int) -> Any:
    import torch

    from tests.bench import contenders, workloads

    torch.set_num_threads(1)
    spec = workloads.WORKLOADS[workload]
    model, batches = spec.build(spec.batch_size, spec.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    workdir = tempfile.mkdtemp(prefix="treadle-profile-")
    return contenders.Context(
        model, batches, optimizer, steps, torch.device("cpu"), "fp32", workdir
    )


def profile(contender: str, workload: str, steps: int, top: int) -> None:
    from tests.bench import contenders

    ctx = _context(workload, steps)
    import treadle  # noqa: F401  (imported before profiling: the import is not a step's cost)

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    contenders.CONTENDERS[contender](ctx)
    profiler.disable()
    elapsed = time.perf_counter() - start
    shutil.rmtree(ctx.workdir, ignore_errors=True)
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.items():
        if OWN.search(filename) and calls >= steps // 2:
            where = f"{Path(filename).parent.name}/{Path(filename).name}:{line}"
            rows.append((own / steps * 1e6, calls / steps, cumulative / steps * 1e6, where, name))
    rows.sort(reverse=True)
    print(
        f"{contender} on {workload}: {steps} steps, {elapsed / steps * 1e6:.0f} us/step under "
        f"cProfile (which inflates Python calls); treadle's functions called at least every other "
        f"step, by own time:\n"
    )
    print(f"{'own us/step':>12} {'calls/step':>10} {'cum us/step':>12}  function")
    for own, calls, cumulative, where, name in rows[:top]:
        print(f"{own:12.2f} {calls:10.2f} {cumulative:12.1f}  {name} ({where})")
    total_calls = sum(r[1] for r in rows)
    print(f"\n{total_calls:.0f} calls/step into treadle's own functions")


# ------------------------------------------------------------------ instruction counts


def _child(contender: str, workload: str, warmup: int, steps: int) -> None:
    """Under callgrind: count only the measured steps (instrumentation toggled by the hook)."""
    from tests.bench import contenders

    ctx = _context(workload, warmup + steps + 1)
    import treadle  # noqa: F401

    def toggle(state: str) -> None:
        subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], check=False,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        time.sleep(0.2)  # the command is picked up while this thread sleeps

    count = 0

    def hook(*_: Any) -> None:
        nonlocal count
        count += 1
        if count == warmup:
            toggle("on")
        elif count == warmup + steps:
            toggle("off")

    ctx.optimizer.register_step_post_hook(hook)
    contenders.CONTENDERS[contender](ctx)
    shutil.rmtree(ctx.workdir, ignore_errors=True)


def instructions(contender: str, workload: str, warmup: int, steps: int) -> dict[str, float]:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    counts = {}
    for name in ("bare", contender):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            command = [
                "valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={tmp}/callgrind.out", sys.executable, "-m",
                "tests.bench.profile", "--child", name, "--workload", workload,
                "--warmup", str(warmup), "--steps", str(steps),
            ]  # fmt: skip
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
            if done.returncode != 0 or found is None:
                raise SystemExit(f"callgrind run of {name} failed:\n{done.stderr[-2000:]}")
            counts[name] = int(found.group(1).replace(",", "")) / steps
    extra = counts[contender] - counts["bare"]
    print(
        f"{workload}: bare {counts['bare']:,.0f} instructions/step, {contender} "
        f"{counts[contender]:,.0f} (+{extra:,.0f}, {extra / counts['bare']:+.2%})"
    )
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.profile", description=__doc__)
    parser.add_argument("--contender", default="treadle", help="default: treadle (no plugins)")
    parser.add_argument("--workload", default="mlp", help="mlp, gpt2 or bert (default: mlp)")
    parser.add_argument("--steps", type=int, default=None, help="steps profiled / counted")
    parser.add_argument("--warmup", type=int, default=30, help="--instructions: steps not counted")
    parser.add_argument("--top", type=int, default=30, help="functions listed")
    parser.add_argument("--instructions", action="store_true", help="count instructions (valgrind)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.child:
        _child(args.child, args.workload, args.warmup, args.steps or 100)
    elif args.instructions:
        instructions(args.contender, args.workload, args.warmup, args.steps or 100)
    else:
        profile(args.contender, args.workload, args.steps or 2000, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
