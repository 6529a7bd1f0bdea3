"""``TREADLE_TRACE_HOOKS``: every hook call, with the plugin that implements it and its duration.

Set it to ``1`` (or ``stderr``) to trace to standard error, or to a file path to append there;
each implementation call is one line::

    treadle trace: on_step_end early-stopping 0.004 ms

The implementations are wrapped when a fit starts (and when a plugin is added), only while the
variable is set: without it nothing is wrapped and tracing costs nothing. Wrappers
(``wrapper=True`` implementations, which surround the others) are not timed.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import pluggy

__all__ = ["TRACE", "trace_hooks"]

TRACE = "TREADLE_TRACE_HOOKS"
_MARK = "_treadle_traced"


def trace_hooks(manager: pluggy.PluginManager) -> None:
    """Wrap every implementation not yet traced, if ``TREADLE_TRACE_HOOKS`` is set."""
    target = os.environ.get(TRACE, "").strip()
    if target.lower() in ("", "0", "false", "no"):
        return
    out = _stream(target)
    for name in dir(manager.hook):
        caller = getattr(manager.hook, name)
        if not isinstance(caller, pluggy.HookCaller):
            continue
        for impl in caller.get_hookimpls():
            if impl.wrapper or impl.hookwrapper or getattr(impl.function, _MARK, False):
                continue
            # pluggy types HookImpl.function as Final; replacing it keeps pluggy's calling
            # convention (the argument names were read at registration) and its order
            impl.function = _timed(impl.function, name, impl.plugin_name, out)  # type: ignore[misc]


@functools.cache
def _stream(target: str) -> TextIO:
    if target.lower() in ("1", "true", "yes", "stderr"):
        return sys.stderr
    handle = open(target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (process-long)
    atexit.register(handle.close)
    return handle


def _timed(function: Callable[..., Any], hook: str, plugin: str, out: TextIO) -> Any:
    @functools.wraps(function)
    def traced(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            elapsed = (time.perf_counter() - start) * 1e3
            with contextlib.suppress(OSError, ValueError):  # a broken stream never stops a run
                out.write(f"treadle trace: {hook} {plugin} {elapsed:.3f} ms\n")

    setattr(traced, _MARK, True)
    return traced
