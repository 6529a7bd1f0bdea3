"""A per-rank watchdog for multi-process runs: a rank that makes no progress says where it is
stuck (step, hook, plugin) and ends, so that the other ranks stop waiting for it.

A rank blocked outside any collective (a plugin waiting on a lock, a file, a network call)
holds every other rank in its next collective until the process group's timeout, after which
the others report a receive timeout that names nobody, and the blocked rank stays blocked. The
watchdog is a daemon thread that wakes a few times per limit and compares a progress marker
(the step and micro-step counters, heartbeats such as evaluation batches, and the collective
the main thread is in); it costs nothing per step. After ``limit_s`` seconds without progress
it prints, on stderr, which hook of which plugin the main thread is in (found by matching the
main thread's frames against the run's hook implementations, as ``Run._blame`` does for
exceptions) and its stack, then ends the process with ``EXIT_CODE``.

A rank waiting inside one of the strategy's collectives is left to the collective's own timeout
(which raises, naming the step): the watchdog acts there only after ``2 * limit_s + 30`` s, for
a process group whose timeout is longer than the limit (one the program made itself).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["EXIT_CODE", "Watchdog"]

#: the exit code of a rank the watchdog ended (as ``timeout(1)`` exits when it ends a command)
EXIT_CODE = 124
#: the most frames of the stuck thread's stack printed
_STACK_FRAMES = 12


class Watchdog:
    """Watches one thread (the one that calls ``start``, normally the main thread) of a run.

    Args:
        run: the run whose state, hooks and plugins are watched and named.
        limit_s: seconds without progress before the rank is ended.
        rank: this process's rank, for the message.
        collectives: the strategy's collective functions (bound methods or functions) by name;
            a thread waiting in one of them is left to the collective's own timeout.
        on_stall: called with the message instead of printing it and ending the process
            (tests).
    """

    def __init__(
        self,
        run: Run,
        limit_s: float,
        *,
        rank: int,
        collectives: Mapping[str, Callable[..., Any]] = {},
        on_stall: Callable[[str], None] | None = None,
    ) -> None:
        self.run = run
        self.limit_s = float(limit_s)
        self.rank = rank
        self.beats = 0  # bumped by whatever makes progress outside steps (evaluation batches)
        self._collectives: dict[CodeType, str] = {}
        for name, function in collectives.items():
            code = getattr(getattr(function, "__func__", function), "__code__", None)
            if code is not None:
                self._collectives[code] = name
        self._on_stall = on_stall if on_stall is not None else _report_and_exit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watched: int | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Watch the calling thread from now on (idempotent)."""
        if self.running:
            return
        self._stop.clear()
        self._watched = threading.get_ident()
        self._thread = threading.Thread(
            target=self._watch, name=f"treadle-watchdog-rank{self.rank}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (idempotent); returns once the thread has ended."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    # ------------------------------------------------------------------ the thread

    def _watch(self) -> None:
        interval = min(5.0, max(self.limit_s / 5, 0.05))
        marker = self._marker()
        since = time.monotonic()
        while not self._stop.wait(interval):
            now_marker, now = self._marker(), time.monotonic()
            if now_marker != marker:
                marker, since = now_marker, now
                continue
            collective = marker[-1]
            limit = self.limit_s if collective is None else 2 * self.limit_s + 30
            if now - since > limit and not self._stop.is_set():
                self._on_stall(self.describe(now - since))
                return

    def _marker(self) -> tuple[int, int, int, str | None]:
        state = self.run.state
        return state.step, state.micro_step, self.beats, self._collective_now()

    def _frame(self) -> FrameType | None:
        return sys._current_frames().get(self._watched) if self._watched is not None else None

    def _collective_now(self) -> str | None:
        frame = self._frame()
        while frame is not None:
            name = self._collectives.get(frame.f_code)
            if name is not None:
                return name
            frame = frame.f_back
        return None

    # ------------------------------------------------------------------ the message

    def describe(self, idle_s: float) -> str:
        """What the watched thread is doing, as the watchdog reports it."""
        frame = self._frame()
        step = self.run.state.step
        collective = self._collective_now()
        if collective is not None:
            head = (
                f"treadle: rank {self.rank} waited {idle_s:.0f} s in collective {collective!r} "
                f"at step {step}, longer than the process group's timeout should allow: "
                "another rank is stuck or has ended (its own output says where)"
            )
        else:
            head = (
                f"treadle: rank {self.rank} made no progress for {idle_s:.0f} s at step {step}, "
                f"{self._where(frame)}"
            )
        stack = "".join(traceback.format_stack(frame)[-_STACK_FRAMES:]) if frame else ""
        return (
            f"{head}; ending this rank (exit code {EXIT_CODE}) so that the other ranks stop "
            f"waiting for it. Config.collective_timeout_s = {self.limit_s:g}: raise it if this "
            f"work is legitimately that slow.\nWhere rank {self.rank} was:\n{stack}"
        )

    def _where(self, frame: FrameType | None) -> str:
        owners = _hook_owners(self.run.plugin_manager)
        innermost = frame
        while frame is not None:
            owner = owners.get(frame.f_code)
            if owner is not None:
                plugin, hook = owner
                return f"in hook {hook!r} of plugin {plugin!r}"
            frame = frame.f_back
        if innermost is None:
            return "where is unknown (its thread has ended)"
        code = innermost.f_code
        return f"outside any hook, in {code.co_name} ({code.co_filename}:{innermost.f_lineno})"


def _hook_owners(manager: pluggy.PluginManager) -> dict[CodeType, tuple[str, str]]:
    """The code of every hook implementation → (plugin name, hook name)."""
    owners: dict[CodeType, tuple[str, str]] = {}
    for hook_name in dir(manager.hook):
        caller = getattr(manager.hook, hook_name)
        if isinstance(caller, pluggy.HookCaller):
            for impl in caller.get_hookimpls():
                code = getattr(impl.function, "__code__", None)
                if code is not None:
                    owners[code] = (impl.plugin_name or "?", hook_name)
    return owners


def _report_and_exit(message: str) -> None:
    """Print ``message`` on stderr (nothing that reports may stop the exit) and end the process."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    with contextlib.suppress(OSError):
        os.write(2, (message if message.endswith("\n") else message + "\n").encode())
    os._exit(EXIT_CODE)
