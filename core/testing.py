"""The strategy conformance kit, and the multi-process harness it runs on.

Any strategy, first-party or a third party's, checks itself against the same suite::

    from treadle.testing import StrategyConformance

    class TestMyStrategy(StrategyConformance):      # pytest collects it
        strategy = functools.partial(MyStrategy, device="cpu")

or calls the checks one by one: :func:`check_loss_parity`, :func:`check_checkpoint_roundtrip`,
:func:`check_agreed_stop`, :func:`check_no_sync`. Each starts ``world_size`` fresh Python
processes on this machine with :func:`run_distributed` (a process group over 127.0.0.1, gloo
by default), trains a tiny model in them and compares the result with what the strategy
promises: the weights of a one-process run with the same global batch, a resumed run that
ends where an uninterrupted one does, ranks that stop together, gradients that are not
synchronised inside ``no_sync``.

A strategy is given as a class or ``functools.partial`` importable by name (the processes
import it), an entry-point name, or a ``{"name": ..., **options}`` mapping. Options must be
JSON values, since they travel to the processes as JSON.

The harness leaves nothing behind: each process starts its own session, watches its parent
and its deadline, and is killed with every descendant (found through ``/proc``) when the
call returns, fails or times out.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import gc
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from treadle.hookspecs import hookimpl

__all__ = [
    "StrategyConformance",
    "TinyBlock",
    "TinyModel",
    "WorkerFailed",
    "check_agreed_stop",
    "check_checkpoint_roundtrip",
    "check_loss_parity",
    "check_no_sync",
    "free_port",
    "run_distributed",
    "run_isolated",
    "tiny_data",
]

#: What distributed runs are compared with: one process on CPU.
REFERENCE: dict[str, Any] = {"name": "single", "device": "cpu"}


class WorkerFailed(AssertionError):
    """A process started by :func:`run_distributed` failed, crashed or ran out of time."""


# ---------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_distributed(
    function: Callable[..., Any] | str,
    *args: Any,
    world_size: int = 2,
    timeout: float = 180.0,
    backend: str = "gloo",
    init_process_group: bool = True,
    env: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Call ``function(*args, **kwargs)`` in ``world_size`` new processes, one per rank.

    The processes get the environment ``torchrun`` would give them (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` = a free port) and this
    process's ``sys.path``. With ``init_process_group`` the harness joins them into the default
    process group first (so several runs in one process share it, and a strategy reuses it)
    and destroys it after ``function`` returns.

    Args:
        function: a module-level function, or ``"package.module:function"``; the processes
            import it.
        args, kwargs: JSON values.
        world_size: the number of processes.
        timeout: seconds for the whole call; then every process is killed.
        backend: the process-group backend for ``init_process_group``.
        init_process_group: join the processes into a group before calling ``function``.
        env: extra environment variables.

    Returns:
        Each rank's return value, in rank order. A value travels through
        ``torch.save``/``torch.load(weights_only=True)``: tensors, numbers, strings, None,
        and lists, tuples and dicts of them.

    Raises:
        WorkerFailed: a process raised, crashed or did not finish in time; the message holds
            every rank's traceback and the end of its output.
    """
    target = function if isinstance(function, str) else _import_path(function)
    spec = {
        "function": target,
        "args": list(args),
        "kwargs": kwargs,
        "backend": backend,
        "init_process_group": init_process_group,
        "timeout": timeout,
        "parent": os.getpid(),
        # the ranks' own watchdog is a backstop for a parent that died: it fires a little after
        # the parent's timeout, so that a timeout is reported as one
        "deadline": time.time() + timeout + 10,
    }
    try:
        text = json.dumps(spec)
    except TypeError as exc:
        raise TypeError(f"run_distributed: arguments must be JSON values ({exc})") from None
    workdir = Path(tempfile.mkdtemp(prefix="treadle-dist-"))
    (workdir / "spec.json").write_text(text)
    base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
        "PYTHONPATH": _python_path(),
        **dict(env or {}),
    }
    base.setdefault("OMP_NUM_THREADS", "1")
    processes: list[subprocess.Popen[bytes]] = []
    failure = None
    try:
        for rank in range(world_size):
            log = open(workdir / f"log-{rank}.txt", "wb")  # noqa: SIM115 (closed below)
            with log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "treadle.testing", str(workdir), str(rank)],
                        env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        failure = _wait(processes, time.monotonic() + timeout)
    finally:
        _kill(processes)
    try:
        if failure is not None:
            raise WorkerFailed(_report(failure, processes, workdir, timeout))
        return [
            torch.load(workdir / f"result-{rank}.pt", weights_only=True)
            for rank in range(world_size)
        ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_isolated(
    argv: Sequence[str],
    *,
    timeout: float = 180.0,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command (``torchrun ...``, ``treadle launch ...``) that may start processes.

    The command runs in a new session with ``MASTER_ADDR=127.0.0.1``, ``OMP_NUM_THREADS=1``
    unless set, and this process's ``sys.path``. When it ends or times out, it and every
    process it started (even ones in sessions of their own, as torchrun's workers are) are
    killed.

    Raises:
        WorkerFailed: the command did not finish within ``timeout`` seconds.

    Returns:
        The exit code and the output (stdout and stderr together, as text).
    """
    full_env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "PYTHONPATH": _python_path(),
        **dict(env or {}),
    }
    full_env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            list(argv),
            env=full_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill([process])
        log.seek(0)
        output = log.read().decode(errors="replace")
    if timed_out:
        raise WorkerFailed(f"{' '.join(argv)} did not finish in {timeout:g} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(list(argv), process.returncode, output)


def _python_path() -> str:
    entries = [p or os.getcwd() for p in sys.path]
    return os.pathsep.join(dict.fromkeys(p for p in entries if os.path.exists(p)))


def _import_path(function: Callable[..., Any]) -> str:
    module = getattr(function, "__module__", None)
    name = getattr(function, "__qualname__", None)
    if not module or not name or module == "__main__" or "<locals>" in name:
        raise TypeError(
            f"{function!r} cannot be imported by the worker processes: pass a function or "
            "class defined at the top level of an importable module, or 'module:attribute'"
        )
    return f"{module}:{name}"


def _import(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def _wait(processes: list[subprocess.Popen[bytes]], deadline: float) -> str | None:
    """None when every process exited 0; else what went wrong first."""
    while True:
        codes = [p.poll() for p in processes]
        if any(code not in (None, 0) for code in codes):
            # The others usually fail a moment later in a collective: let them say so too.
            grace = time.monotonic() + 2.0
            while time.monotonic() < grace and any(p.poll() is None for p in processes):
                time.sleep(0.05)
            codes = [p.poll() for p in processes]
            failed = [
                f"rank {rank} exited with {_describe_exit(code)}"
                for rank, code in enumerate(codes)
                if code not in (None, 0)
            ]
            return "; ".join(failed)
        if all(code == 0 for code in codes):
            return None
        if time.monotonic() > deadline:
            waiting = [rank for rank, code in enumerate(codes) if code is None]
            return f"timed out; ranks {waiting} were still running"
        time.sleep(0.05)


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def _report(
    failure: str, processes: list[subprocess.Popen[bytes]], workdir: Path, timeout: float
) -> str:
    parts = [f"distributed test failed: {failure} (timeout {timeout:g} s)"]
    for rank, process in enumerate(processes):
        code = process.returncode
        state = "killed by the harness" if code is None else _describe_exit(code)
        parts.append(f"\n--- rank {rank}: {state}")
        error = workdir / f"error-{rank}.txt"
        if error.exists():
            parts.append(error.read_text())
        log = workdir / f"log-{rank}.txt"
        if log.exists():
            parts.append("output (end):\n" + log.read_text(errors="replace")[-3000:])
    return "\n".join(parts)


def _kill(processes: Sequence[subprocess.Popen[Any]]) -> None:
    """Kill each process, its process group and every descendant; then reap."""
    own_group = os.getpgrp()
    for process in processes:
        if process.poll() is not None:
            continue  # exited and reaped: its pid may already belong to another process
        # Listed first: once a parent dies its children are adopted by init and lost to us.
        family = [process.pid, *_descendants(process.pid)]
        for pid in family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(pid)
                if group != own_group:
                    os.killpg(group, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from ``/proc`` (empty where there is no ``/proc``)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (command) state ppid ...": the command may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _worker_main(argv: Sequence[str]) -> None:
    """Entry point of a process started by ``run_distributed``: ``WORKDIR RANK``."""
    workdir, rank = Path(argv[0]), int(argv[1])
    spec = json.loads((workdir / "spec.json").read_text())
    _watch(int(spec["parent"]), float(spec["deadline"]))
    code = 0
    import torch.distributed as dist

    try:
        if spec["init_process_group"]:
            dist.init_process_group(
                spec["backend"], timeout=datetime.timedelta(seconds=float(spec["timeout"]))
            )
        result = _import(spec["function"])(*spec["args"], **spec["kwargs"])
        tmp = workdir / f".result-{rank}.pt"
        torch.save(result, tmp)
        os.replace(tmp, workdir / f"result-{rank}.pt")
    except BaseException:
        (workdir / f"error-{rank}.txt").write_text(traceback.format_exc())
        code = 1
    finally:
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.exit(code)


def _watch(parent: int, deadline: float) -> None:
    """Kill this process and its descendants if the parent dies or the deadline passes."""

    def watch() -> None:
        while os.getppid() == parent and time.time() < deadline:
            time.sleep(0.5)
        print("treadle.testing: parent gone or deadline passed; exiting", file=sys.stderr)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="treadle-watchdog").start()


# ---------------------------------------------------------------------- the workload


class TinyBlock(nn.Module):
    """A residual tanh layer: a unit for sharding strategies to wrap."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


class TinyModel(nn.Module):
    """A small regressor; ``forward(x, y)`` returns ``{"loss": mse}``.

    Declares ``_no_split_modules`` (the transformers convention) so that sharding strategies
    find units to wrap without being told.
    """

    _no_split_modules: ClassVar[list[str]] = ["TinyBlock"]

    def __init__(self, features: int = 8, width: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.blocks = nn.Sequential(*(TinyBlock(width) for _ in range(blocks)))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        prediction = self.head(self.blocks(self.embed(x))).squeeze(-1)
        return {"loss": nn.functional.mse_loss(prediction, y)}


class _Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index]}


def tiny_data(n: int = 64, features: int = 8, seed: int = 1234) -> torch.utils.data.Dataset[Any]:
    """A map-style dataset of ``{"x", "y"}`` rows, the same for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = torch.sin(x.sum(-1))
    return _Rows(x, y)


def _model(seed: int) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel()


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)


# ---------------------------------------------------------------------- specs


def _portable(spec: Any) -> Any:
    """A strategy/optimizer/... spec as JSON, to rebuild in the worker processes."""
    if spec is None or isinstance(spec, str | bool | int | float):
        return spec
    if isinstance(spec, Mapping):
        return {"mapping": dict(spec)}
    if isinstance(spec, functools.partial):
        return {
            "factory": _import_path(spec.func),
            "args": list(spec.args),
            "kwargs": dict(spec.keywords),
        }
    if callable(spec):
        return {"factory": _import_path(spec), "args": [], "kwargs": {}}
    raise TypeError(
        f"cannot send {spec!r} to the worker processes: give a name, a mapping, or a class, "
        "function or functools.partial defined at the top level of an importable module"
    )


def _rebuild(spec: Any, *, call: bool) -> Any:
    """The inverse of ``_portable``; factories are called (components) or not (optimizers)."""
    if isinstance(spec, str) and ":" in spec:
        spec = {"factory": spec, "args": [], "kwargs": {}}
    if not isinstance(spec, dict):
        return spec
    if "mapping" in spec:
        return spec["mapping"]
    factory = functools.partial(_import(spec["factory"]), *spec["args"], **spec["kwargs"])
    return factory() if call else factory


def _make_run(
    strategy: Any,
    *,
    output_dir: str,
    max_steps: int,
    batch_size: int,
    grad_accum_steps: int,
    model_seed: int = 0,
    checkpoint: Any = None,
    optimizer: Any = None,
    precision: Any = None,
    resume: str | None = None,
    save_at_end: bool = False,
    plugins: Sequence[Any] = (),
) -> Any:
    from torch.utils.data import DataLoader

    from treadle.config import Config
    from treadle.run import Run

    options: dict[str, Any] = {}
    if checkpoint is not None:
        options["checkpoint"] = _rebuild(checkpoint, call=True)
    if precision is not None:
        options["precision"] = _rebuild(precision, call=True)
    config = Config(
        max_steps=max_steps,
        grad_accum_steps=grad_accum_steps,
        log_every=2,
        seed=0,
        output_dir=output_dir,
        resume=resume,
        save_at_end=save_at_end,
        eval_at_end=False,
    )
    return Run(
        _model(model_seed),
        train_data=DataLoader(tiny_data(), batch_size=batch_size, shuffle=True),
        config=config,
        strategy=_rebuild(strategy, call=True),
        optimizer=_rebuild(optimizer, call=False) if optimizer is not None else _adamw,
        loggers=[],
        plugins=list(plugins),
        **options,
    )


class _Record:
    """Remembers the last logged training loss, the step a fit began at, and stop reasons."""

    def __init__(self) -> None:
        self.loss: float | None = None
        self.begin_step: int | None = None

    @hookimpl
    def on_fit_begin(self, run: Any) -> None:
        self.begin_step = run.state.step

    @hookimpl
    def on_log(self, metrics: Mapping[str, float]) -> None:
        if "loss" in metrics:
            self.loss = float(metrics["loss"])


class _RequestAt:
    """Asks for a stop or a save on one rank only, after one step."""

    def __init__(self, rank: int, step: int, what: str) -> None:
        self.rank, self.step, self.what = rank, step, what

    @hookimpl
    def on_step_end(self, run: Any) -> None:
        if run.strategy.rank == self.rank and run.state.step == self.step:
            if self.what == "stop":
                run.request_stop(f"conformance: stop asked on rank {self.rank}")
            else:
                run.request_save()


def _weights(run: Any) -> dict[str, torch.Tensor]:
    """The full weights as the strategy lays them out (complete on the main process)."""
    state = run.strategy.model_state_dict(run.wrapped_model)
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


# ---------------------------------------------------------------------- workers


def _train_worker(strategy: Any, settings: dict[str, Any]) -> dict[str, Any]:
    record = _Record()
    with _make_run(strategy, plugins=[record], **settings) as run:
        run.fit()
        weights = _weights(run)
        return {
            "weights": weights if run.is_main_process else {},
            "step": run.state.step,
            "loss": record.loss,
            "world_size": run.strategy.world_size,
        }


def _roundtrip_worker(
    strategy: Any, settings: dict[str, Any], root: str, steps: int, stop_at: int
) -> dict[str, Any]:
    with _make_run(strategy, output_dir=f"{root}/whole", max_steps=steps, **settings) as run:
        run.fit()
        whole = _weights(run)
    with _make_run(
        strategy, output_dir=f"{root}/parts", max_steps=stop_at, save_at_end=True, **settings
    ) as run:
        run.fit()
    record = _Record()
    # Other initial weights: only the checkpoint can make the resumed run right.
    with _make_run(
        strategy,
        output_dir=f"{root}/parts",
        max_steps=steps,
        resume="auto",
        model_seed=1,
        plugins=[record],
        **settings,
    ) as run:
        run.fit()
        resumed = _weights(run)
        main = run.is_main_process
    return {
        "whole": whole if main else {},
        "resumed": resumed if main else {},
        "begin_step": record.begin_step,
    }


def _stop_worker(
    strategy: Any, settings: dict[str, Any], stop_rank: int, stop_step: int, save_rank: int
) -> dict[str, Any]:
    plugins = [_RequestAt(stop_rank, stop_step, "stop"), _RequestAt(save_rank, 1, "save")]
    with _make_run(strategy, plugins=plugins, **settings) as run:
        run.fit()
        saved = sorted(p.name for p in (run.output_dir / "checkpoints").glob("step-*"))
        return {"step": run.state.step, "reason": run.state.stop_reason, "saved": saved}


def _no_sync_worker(strategy: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """One accumulation window by hand: a backward inside ``no_sync``, then a synced one."""
    run = _make_run(strategy, max_steps=1, **settings)
    try:
        reference = copy.deepcopy(run.model)
        run.setup()
        run.setup_optimizer()
        strategy_ = run.strategy
        model = run.wrapped_model
        rank, world = strategy_.rank, strategy_.world_size
        data = tiny_data()
        size = settings["batch_size"]

        def batch(r: int, micro: int) -> dict[str, torch.Tensor]:
            start = (micro * world + r) * size
            rows = [data[i] for i in range(start, start + size)]
            return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}

        with strategy_.no_sync(model):
            loss = model(**strategy_.to_device(batch(rank, 0)))["loss"]
            strategy_.backward(loss)
        inside = _full_grads(strategy_, model)
        loss = model(**strategy_.to_device(batch(rank, 1)))["loss"]
        strategy_.backward(loss)
        after = _full_grads(strategy_, model)
        # What the synchronised window must hold: the rank-mean of each micro-batch's gradient,
        # summed over the window (the kernel divides by the window length afterwards).
        for micro in range(2):
            for r in range(world):
                (reference(**batch(r, micro))["loss"] / world).backward()
        expected = {
            name: p.grad.detach().clone()
            for name, p in reference.named_parameters()
            if p.grad is not None
        }
        return {"inside": inside, "after": after, "expected": expected}
    finally:
        run.close()


def _full_grads(strategy: Any, model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Each parameter's gradient as this rank sees it, gathered whole if sharded."""
    grads: dict[str, torch.Tensor | None] = {}
    for name, param in strategy.unwrap_model(model).named_parameters():
        grad = param.grad
        if grad is not None and hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()  # a collective: every rank visits parameters alike
        grads[name] = None if grad is None else grad.detach().to("cpu", copy=True)
    return grads


# ---------------------------------------------------------------------- the checks


def _settings(
    per_device_batch: int,
    grad_accum_steps: int,
    steps: int,
    optimizer: Any,
    precision: Any,
    checkpoint: Any = None,
    output_dir: str = "",
) -> dict[str, Any]:
    return {
        "batch_size": per_device_batch,
        "grad_accum_steps": grad_accum_steps,
        "max_steps": steps,
        "optimizer": _portable(optimizer),
        "precision": _portable(precision),
        "checkpoint": _portable(checkpoint),
        "output_dir": output_dir,
    }


@contextlib.contextmanager
def _scratch() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="treadle-conformance-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _compare(
    actual: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    atol: float,
    rtol: float,
    what: str,
) -> float:
    """Largest absolute difference; AssertionError naming the worst tensor beyond tolerance."""
    if set(actual) != set(expected):
        raise AssertionError(
            f"{what}: different names: only in the result {sorted(set(actual) - set(expected))}"
            f", only in the reference {sorted(set(expected) - set(actual))}"
        )
    worst = 0.0
    for name in sorted(expected):
        a, e = actual[name].double(), expected[name].double()
        if a.shape != e.shape:
            raise AssertionError(f"{what}: {name} has shape {tuple(a.shape)}, not {tuple(e.shape)}")
        diff = float((a - e).abs().max()) if a.numel() else 0.0
        worst = max(worst, diff)
        if not torch.allclose(a, e, atol=atol, rtol=rtol):
            raise AssertionError(
                f"{what}: {name} differs by up to {diff:.3g} "
                f"(tolerance atol={atol:g}, rtol={rtol:g})"
            )
    return worst


def check_loss_parity(
    strategy: Any,
    *,
    world_size: int = 2,
    per_device_batch: int = 4,
    grad_accum_steps: int = 2,
    steps: int = 6,
    reference: Any = REFERENCE,
    optimizer: Any = None,
    precision: Any = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    timeout: float = 180.0,
) -> dict[str, Any]:
    """``strategy`` on ``world_size`` processes trains like one process with the same global batch.

    The reference (one process, this one) sees batches of ``per_device_batch * world_size``
    rows; the strategy's ranks see ``per_device_batch`` rows each, sharded from the same
    seeded order, with ``grad_accum_steps`` micro-batches per step (so ``no_sync`` is used)
    and enough steps to cross an epoch (so the order is reshuffled). The final weights must
    agree within ``atol``/``rtol`` (float32 sums in another order), every rank must log the
    same training loss (the mean over ranks), and it must match the reference's.

    Returns:
        ``{"max_abs_diff": ..., "loss": ..., "reference_loss": ...}``.
    """
    with _scratch() as root:
        settings = _settings(per_device_batch, grad_accum_steps, steps, optimizer, precision)
        single = _train_worker(
            _portable(reference),
            {
                **settings,
                "batch_size": per_device_batch * world_size,
                "output_dir": f"{root}/reference",
            },
        )
        results = run_distributed(
            _train_worker,
            _portable(strategy),
            {**settings, "output_dir": f"{root}/distributed"},
            world_size=world_size,
            timeout=timeout,
        )
    for rank, result in enumerate(results):
        if result["world_size"] != world_size:
            raise AssertionError(
                f"rank {rank}: the strategy reports world size {result['world_size']}, "
                f"not {world_size}"
            )
        if result["step"] != steps:
            raise AssertionError(f"rank {rank} stopped at step {result['step']}, not {steps}")
    losses = [result["loss"] for result in results]
    if len(set(losses)) != 1:
        raise AssertionError(f"ranks logged different training losses: {losses}")
    diff = _compare(
        results[0]["weights"], single["weights"], atol=atol, rtol=rtol, what="final weights"
    )
    if not _close(losses[0], single["loss"], atol=atol, rtol=rtol):
        raise AssertionError(
            f"logged training loss {losses[0]} differs from the reference's {single['loss']}"
        )
    return {"max_abs_diff": diff, "loss": losses[0], "reference_loss": single["loss"]}


def _close(a: float | None, b: float | None, *, atol: float, rtol: float) -> bool:
    return a is not None and b is not None and abs(a - b) <= atol + rtol * abs(b)


def check_checkpoint_roundtrip(
    strategy: Any,
    *,
    checkpoint: Any = None,
    world_size: int = 2,
    per_device_batch: int = 4,
    grad_accum_steps: int = 2,
    steps: int = 6,
    stop_at: int = 3,
    optimizer: Any = None,
    precision: Any = None,
    atol: float = 0.0,
    timeout: float = 180.0,
) -> dict[str, Any]:
    """Save at ``stop_at`` (mid-epoch), resume with the same strategy: the same final weights.

    In the same processes: an uninterrupted run of ``steps`` steps; a run that stops and
    saves at ``stop_at``; a run built from other initial weights that resumes from that
    checkpoint and trains to ``steps``. The resumed run must begin at ``stop_at`` and end
    with the uninterrupted run's weights: exactly by default (``atol=0``), as on CPU a
    resumed run continues bit for bit.

    Args:
        checkpoint: the checkpoint format (a name, mapping or factory); None for the run's
            default.
    """
    with _scratch() as root:
        settings = _settings(
            per_device_batch, grad_accum_steps, steps, optimizer, precision, checkpoint
        )
        del settings["max_steps"], settings["output_dir"]
        results = run_distributed(
            _roundtrip_worker,
            _portable(strategy),
            settings,
            root,
            steps,
            stop_at,
            world_size=world_size,
            timeout=timeout,
        )
    for rank, result in enumerate(results):
        if result["begin_step"] != stop_at:
            raise AssertionError(
                f"rank {rank}: the resumed run began at step {result['begin_step']}, "
                f"not at the checkpoint's step {stop_at}"
            )
    diff = _compare(
        results[0]["resumed"],
        results[0]["whole"],
        atol=atol,
        rtol=0.0,
        what="resumed run vs uninterrupted run",
    )
    return {"max_abs_diff": diff}


def check_agreed_stop(
    strategy: Any,
    *,
    world_size: int = 2,
    stop_rank: int = 1,
    stop_step: int = 2,
    save_rank: int = 0,
    checkpoint: Any = None,
    optimizer: Any = None,
    precision: Any = None,
    timeout: float = 180.0,
) -> dict[str, Any]:
    """A stop asked for on one rank stops every rank at that step; a save asked for on
    another rank (after step 1) is written by all.
    """
    with _scratch() as root:
        settings = _settings(4, 1, stop_step + 4, optimizer, precision, checkpoint, root)
        results = run_distributed(
            _stop_worker,
            _portable(strategy),
            settings,
            stop_rank,
            stop_step,
            save_rank,
            world_size=world_size,
            timeout=timeout,
        )
    steps = [result["step"] for result in results]
    if steps != [stop_step] * world_size:
        raise AssertionError(f"ranks stopped at steps {steps}; all should stop at {stop_step}")
    reason = results[stop_rank]["reason"]
    if not (reason or "").startswith("conformance: stop"):
        raise AssertionError(f"rank {stop_rank} stopped for {reason!r}, not for its request")
    if "step-000001" not in results[0]["saved"]:
        raise AssertionError(
            f"the save asked for on rank {save_rank} after step 1 was not written: "
            f"checkpoints {results[0]['saved']}"
        )
    return {"steps": steps, "reasons": [result["reason"] for result in results]}


def check_no_sync(
    strategy: Any,
    *,
    world_size: int = 2,
    per_device_batch: int = 4,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    timeout: float = 180.0,
) -> None:
    """Inside ``no_sync`` gradients are not synchronised; the next backward synchronises all.

    Each rank back-propagates a different micro-batch inside ``strategy.no_sync(model)``:
    afterwards the ranks must not all hold the same gradient (it was not averaged; a
    sharded strategy may hold none yet). Then one more micro-batch each, outside: every rank
    must hold the average over ranks of both micro-batches' gradients, which a copy of the
    model computes in one process.
    """
    with _scratch() as root:
        settings = _settings(per_device_batch, 1, 1, None, None, output_dir=root)
        del settings["max_steps"]
        results = run_distributed(
            _no_sync_worker,
            _portable(strategy),
            settings,
            world_size=world_size,
            timeout=timeout,
        )
    for name in results[0]["inside"]:
        grads = [result["inside"][name] for result in results]
        if all(g is not None for g in grads) and all(torch.equal(g, grads[0]) for g in grads):
            raise AssertionError(
                f"inside no_sync, {name}'s gradient is the same on every rank although the "
                "ranks saw different data: it was synchronised"
            )
    for rank, result in enumerate(results):
        after = {k: v for k, v in result["after"].items() if v is not None}
        _compare(
            after,
            result["expected"],
            atol=atol,
            rtol=rtol,
            what=f"rank {rank}: gradients after the window's synchronised backward",
        )


class StrategyConformance:
    """Subclass it in a test module to run every check against a strategy::

        class TestMyStrategy(StrategyConformance):
            strategy = functools.partial(MyStrategy, device="cpu")
            checkpoint = "safetensors"         # for the round trip; None: the run's default

    Class attributes tune the checks (tolerances for strategies that reduce in another
    precision). A check a strategy does not support can be skipped by overriding its method.
    """

    strategy: ClassVar[Any] = None
    checkpoint: ClassVar[Any] = None
    world_size: ClassVar[int] = 2
    atol: ClassVar[float] = 1e-5
    rtol: ClassVar[float] = 1e-4
    roundtrip_atol: ClassVar[float] = 0.0
    timeout: ClassVar[float] = 180.0

    def _strategy(self) -> Any:
        # Read from the class dict: a plain function as a class attribute must not be bound.
        strategy = next(
            k.__dict__["strategy"] for k in type(self).__mro__ if "strategy" in k.__dict__
        )
        if isinstance(strategy, staticmethod):
            strategy = strategy.__func__
        if strategy is None:
            raise AssertionError(f"{type(self).__name__} must set the class attribute 'strategy'")
        return strategy

    def test_loss_parity(self) -> None:
        check_loss_parity(
            self._strategy(),
            world_size=self.world_size,
            atol=self.atol,
            rtol=self.rtol,
            timeout=self.timeout,
        )

    def test_checkpoint_roundtrip(self) -> None:
        check_checkpoint_roundtrip(
            self._strategy(),
            checkpoint=self.checkpoint,
            world_size=self.world_size,
            atol=self.roundtrip_atol,
            timeout=self.timeout,
        )

    def test_agreed_stop(self) -> None:
        check_agreed_stop(
            self._strategy(),
            world_size=self.world_size,
            checkpoint=self.checkpoint,
            timeout=self.timeout,
        )

    def test_no_sync(self) -> None:
        check_no_sync(self._strategy(), world_size=self.world_size, timeout=self.timeout)


if __name__ == "__main__":
    # Run the real module's function, not this __main__ copy, so that classes are one.
    from treadle.testing import _worker_main as main

    main(sys.argv[1:])
