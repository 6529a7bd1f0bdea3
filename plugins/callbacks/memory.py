"""``memory``: peak host memory and, on an accelerator, peak device memory, in every training log.

Adds to every training log (the record with ``"loss"``):

* ``memory/host_peak_rss_mb``: the process's peak resident set size so far (``getrusage``);
* ``memory/host_rss_mb``: its resident set size now (Linux only, from ``/proc``);
* ``memory/<device>_peak_allocated_mb``: on a device whose torch module keeps allocator
  statistics (``torch.cuda``, ``torch.xpu``, ...), the peak memory held by tensors since the
  previous log (the peak counter is reset after each reading; ``reset_peak=False`` keeps the
  peak since the start instead, and leaves the counter alone for your own code);
* ``memory/<device>_reserved_mb``: the memory the caching allocator holds now.

Values are MiB (2**20 bytes). Reading them needs no host-device synchronisation, and nothing
is done between logs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from treadle.errors import ConfigError
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["Memory", "host_peak_rss_bytes", "host_rss_bytes"]

_MIB = float(2**20)


def host_peak_rss_bytes() -> int | None:
    """The process's peak resident set size, or None where ``resource`` is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes; Linux: KiB


def host_rss_bytes() -> int | None:
    """The process's resident set size now (Linux), or None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            resident_pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class Memory:
    """Host and device memory in every training log.

    Args:
        reset_peak: reset the device's peak counter after each reading, so that each log
            shows the peak of its own interval.
    """

    name: ClassVar[str] = "memory"

    def __init__(self, reset_peak: bool = True) -> None:
        if not isinstance(reset_peak, bool):
            raise ConfigError(
                f"memory option reset_peak = {reset_peak!r} is not allowed: expected True or False"
            )
        self.reset_peak = reset_peak

    @hookimpl(wrapper=True)
    def on_log(self, run: Run, metrics: Mapping[str, float]) -> Generator[None, Any, Any]:
        if "loss" in metrics and isinstance(metrics, MutableMapping):
            metrics.update(self.measure(run.device))
        return (yield)

    def measure(self, device: torch.device) -> dict[str, float]:
        """The memory figures now, for the host and ``device``."""
        values = {}
        peak, rss = host_peak_rss_bytes(), host_rss_bytes()
        if rss is not None:
            values["memory/host_rss_mb"] = rss / _MIB
        if peak is not None:
            # the kernel updates the peak lazily: it can trail the resident size just read
            values["memory/host_peak_rss_mb"] = max(peak, rss or 0) / _MIB
        module = getattr(torch, device.type, None) if device.type != "cpu" else None
        if module is not None and callable(getattr(module, "max_memory_allocated", None)):
            prefix = f"memory/{device.type}"
            values[f"{prefix}_peak_allocated_mb"] = module.max_memory_allocated(device) / _MIB
            if callable(getattr(module, "memory_reserved", None)):
                values[f"{prefix}_reserved_mb"] = module.memory_reserved(device) / _MIB
            if self.reset_peak and callable(getattr(module, "reset_peak_memory_stats", None)):
                module.reset_peak_memory_stats(device)
        return values
