"""The child process: one contender on one workload (or one import), reported as one JSON line.

``python -m tests.bench.worker '<json spec>'``, started by the runner with ``OMP_NUM_THREADS=1``
and ``TREADLE_BENCH_T0`` (the wall time just before the process was spawned). Only the standard
library is imported at module level, so that the time to first step and the peak RSS count
exactly what the contender imports.

Step times come from a post-step hook on the optimizer (``register_step_post_hook``): the same
hook, costing the same, in every contender, whatever its framework does around the step.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from typing import Any

MARK = "@@treadle-bench@@ "


class Clock:
    """Records ``time.perf_counter()`` after every optimizer step, without allocating.

    On a GPU the host runs ahead of the device, so the clock synchronises at the two steps that
    bound the measured interval (the last warm-up step and the last step) and nowhere else:
    throughput is exact, single step times are the host's.
    """

    def __init__(self, total: int, warmup: int, synchronize: Any = None) -> None:
        self.times = [0.0] * total
        self.count = 0
        self.first_wall = 0.0
        # CPU time of this thread over the measured steps: what other processes' load
        # disturbs least (they take the CPU away; they add little CPU time to ours)
        self.cpu = [0.0, 0.0]
        self._cpu_at = {warmup - 1: 0, total - 1: 1}
        self._sync_at = {warmup - 1, total - 1} if synchronize is not None else set()
        self._synchronize = synchronize

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        index = self.count
        if index in self._sync_at:
            self._synchronize()
        if index < len(self.times):
            self.times[index] = time.perf_counter()
        if index in self._cpu_at:
            self.cpu[self._cpu_at[index]] = time.thread_time()
        if index == 0:
            self.first_wall = time.time()
        self.count = index + 1


def _usage() -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "cpu_user_s": usage.ru_utime,
        "cpu_sys_s": usage.ru_stime,
    }


def run_import(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    """Time each statement in turn: ``import torch`` first, then what the contender adds."""
    times = []
    for statement in spec["statements"]:  # from the runner's own table
        start = time.perf_counter()
        exec(statement, {})
        times.append(time.perf_counter() - start)
    return {
        "import_s": sum(times),
        "over_first_s": sum(times[1:]),
        "ready_s": time.time() - t0,
        **_usage(),
    }


def run_train(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    from tests.bench import contenders, workloads

    workload = workloads.WORKLOADS[spec["workload"]]
    device = torch.device(spec["device"])
    precision = spec.get("precision", "fp32")
    warmup, total = int(spec["warmup"]), int(spec["warmup"]) + int(spec["steps"])
    model, batches = workload.build(int(spec["batch_size"]), int(spec["seq_len"]))
    model.to(device)
    on_cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True if on_cuda else None)
    clock = Clock(total, warmup, torch.cuda.synchronize if on_cuda else None)
    optimizer.register_step_post_hook(clock)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="treadle-bench-") as workdir:
        context = contenders.Context(
            model=model,
            batches=batches,
            optimizer=optimizer,
            steps=total,
            device=device,
            precision=precision,
            workdir=workdir,
        )
        contenders.CONTENDERS[spec["contender"]](context)
    end_wall = time.time()
    if clock.count != total:
        raise RuntimeError(
            f"{spec['contender']} took {clock.count} optimizer steps, expected {total}"
        )
    # the same final evaluation for everyone: identical weights give identical numbers.
    # Lightning's teardown moves the module back to the CPU, so place it again.
    model.to(device)
    model.eval()
    batch = {k: v.to(device) for k, v in batches[0].items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with torch.no_grad(), autocast:
        final_loss = float(model(**batch)["loss"].float().item())
    checksum = float(sum(p.detach().double().sum().item() for p in model.parameters()))
    times = clock.times
    return {
        "step_times_s": [round(b - a, 9) for a, b in zip(times[warmup - 1 :], times[warmup:])],
        "measured_s": times[-1] - times[warmup - 1],
        "measured_cpu_s": clock.cpu[1] - clock.cpu[0],
        "first_step_s": clock.first_wall - t0,
        "train_wall_s": end_wall - t0,
        "final_loss": final_loss,
        "weights_checksum": checksum,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "gpu_peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
        "gpu_name": torch.cuda.get_device_name(device) if on_cuda else None,
        **_usage(),
    }


def run_probe(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    """The largest candidate batch size whose bare bf16 steps peak under 90% of the device."""
    import gc

    import torch

    device = torch.device(spec["device"])
    if device.type != "cuda":  # a smoke test on the CPU: the smallest, nothing to fill
        return {"batch_size": spec["candidates"][-1], "peak_gb": 0.0, "total_gb": 0.0}
    total = torch.cuda.get_device_properties(device).total_memory
    for batch_size in spec["candidates"]:
        try:
            peak = _peak_memory(spec["workload"], batch_size, int(spec["seq_len"]), device)
        except torch.cuda.OutOfMemoryError:
            peak = None
        gc.collect()  # the attempt's model and activations, before the next one
        torch.cuda.empty_cache()
        if peak is not None and peak <= 0.9 * total:
            return {"batch_size": batch_size, "peak_gb": peak / 2**30, "total_gb": total / 2**30}
    raise RuntimeError(f"no batch size in {spec['candidates']} fits the device")


def _peak_memory(workload: str, batch_size: int, seq_len: int, device: Any) -> int:
    import torch

    from tests.bench import workloads

    model, batches = workloads.WORKLOADS[workload].build(batch_size, seq_len)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    torch.cuda.reset_peak_memory_stats(device)
    batch = {k: v.to(device) for k, v in batches[0].items()}
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def main(argv: list[str]) -> int:
    t0 = float(os.environ.get("TREADLE_BENCH_T0", time.time()))
    spec = json.loads(argv[0])
    kinds = {"import": run_import, "train": run_train, "probe": run_probe}
    result = kinds[spec["kind"]](spec, t0)
    sys.stdout.flush()
    print(MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
