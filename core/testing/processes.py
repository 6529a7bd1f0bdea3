"""The multi-process harness: start ranks on this machine, collect their results, kill them all.

:func:`run_distributed` calls a function in ``world_size`` fresh Python processes joined into a
process group over 127.0.0.1 (gloo by default); :func:`run_isolated` runs a command
(``torchrun ...``) that may start processes of its own. Neither leaves anything behind: each
process starts its own session, watches its parent and its deadline, and is killed with every
descendant (found through ``/proc``) when the call returns, fails or times out.
"""

from __future__ import annotations

import contextlib
import datetime
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["WorkerFailed", "free_port", "run_distributed", "run_isolated"]


class WorkerFailed(AssertionError):
    """A process started by :func:`run_distributed` failed, crashed or ran out of time."""


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
        for pid in [process.pid, *_descendants(process.pid)]:
            _kill_one(pid, own_group)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


def _kill_one(pid: int, own_group: int) -> None:
    """SIGKILL ``pid`` and its process group, unless that group is ours."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        group = os.getpgid(pid)
        if group != own_group:
            os.killpg(group, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


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
