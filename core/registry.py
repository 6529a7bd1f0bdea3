"""Discovery: components and plugins are found through package entry points, by kind and name.

Names are read from installed distributions' metadata without importing anything; only the
entry point asked for is loaded. A broken entry point therefore fails only the run that names
it, and two distributions declaring the same name are reported instead of one silently winning.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import importlib_metadata

from treadle.errors import PluginLoadError, TreadleError, UnknownNameError

__all__ = ["KINDS", "Entry", "adapt", "entries", "installed", "load", "refresh"]

#: One entry-point group per kind: ``treadle.<kind>``. Components and plugins are chosen by
#: name; every installed ``adapter`` is asked about a ``plugins=`` object that implements no
#: treadle hook (see ``adapt``); a ``command`` is a subcommand of the ``treadle`` CLI
#: (``treadle NAME ARGS...`` calls it with ``ARGS`` and exits with what it returns).
KINDS = (
    "strategy", "precision", "optimizer", "scheduler", "logger", "checkpoint", "plugin", "adapter",
    "command",
)  # fmt: skip


class Entry(NamedTuple):
    """One installed name: where it comes from and what it points at (not imported)."""

    kind: str
    name: str
    value: str
    distribution: str
    version: str


@functools.cache
def entries(kind: str) -> dict[str, list[Entry]]:
    """Every installed name of ``kind``, each with the distributions declaring it."""
    if kind not in KINDS:
        raise TreadleError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
    found: dict[str, list[Entry]] = {}
    for point in importlib_metadata.entry_points(group=f"treadle.{kind}"):
        dist = point.dist
        entry = Entry(
            kind,
            point.name,
            point.value,
            dist.name if dist else "?",
            dist.version if dist else "?",
        )
        same = found.setdefault(point.name, [])
        # The same distribution can be visible twice (editable install plus a stale copy on
        # sys.path); that is one declaration, not a conflict.
        if all(e.distribution != entry.distribution for e in same):
            same.append(entry)
    return found


def refresh() -> None:
    """Forget cached entry points (after installing or removing a package in-process)."""
    import importlib

    importlib.invalidate_caches()
    entries.cache_clear()


def installed() -> Iterator[Entry]:
    """Every installed name, sorted by kind then name."""
    for kind in KINDS:
        for name in sorted(entries(kind)):
            yield from entries(kind)[name]


def load(kind: str, name: str) -> Any:
    """Import and return the object that the entry point ``name`` of ``kind`` points at."""
    candidates = entries(kind).get(name)
    if not candidates:
        raise UnknownNameError(kind, name, entries(kind))
    if len(candidates) > 1:
        who = " and ".join(f"{e.distribution} {e.version} ({e.value})" for e in candidates)
        raise TreadleError(
            f"{kind} {name!r} is declared by more than one installed distribution: {who}. "
            f"Uninstall one of them, or pass the {kind} as an object instead of by name."
        )
    entry = candidates[0]
    point = importlib_metadata.EntryPoint(
        name=entry.name, value=entry.value, group=f"treadle.{kind}"
    )
    try:
        return point.load()
    except (Exception, SystemExit) as exc:  # a module calling sys.exit() at import, too
        raise PluginLoadError(kind, name, entry.value, entry.distribution, exc) from exc


def adapt(obj: object) -> tuple[str, object] | None:
    """A treadle plugin for ``obj``, a foreign plugin object, from the first installed adapter
    that accepts it: ``(adapter name, plugin)``; None when no adapter does.

    An adapter is a callable declared in the ``treadle.adapter`` entry-point group; it is called
    with the object and returns an object with ``@treadle.hookimpl`` methods, or None when it
    does not handle that kind of object. This is how a package such as ``treadle-hf`` makes
    ``plugins=[SomeTrainerCallback()]`` work without the kernel naming any foreign library.
    Adapters are imported only here, when such an object is passed.
    """
    for name in sorted(entries("adapter")):
        adapter = load("adapter", name)
        try:
            plugin = adapter(obj)
        except Exception as exc:
            raise TreadleError(
                f"adapter {name!r} failed on {type(obj).__qualname__}: {type(exc).__name__}: {exc}"
            ) from exc
        if plugin is not None:
            return name, plugin
    return None
