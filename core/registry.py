"""Discovery: components and plugins are found through package entry points, by kind and name.

Names are read from installed distributions' metadata without importing anything; only the
entry point asked for is loaded. A broken entry point therefore fails only the run that names
it, and two distributions declaring the same name are reported instead of one silently winning.

A distribution declares the treadle versions it supports as an ordinary requirement
(``dependencies = ["treadle>=0.1,<0.3"]``); loading one of its names under another treadle
version fails that run only, naming both versions.

Two environment variables hide installed names (read when the registry is first asked, or at
``refresh()``): ``TREADLE_DISABLE_PLUGINS=name,kind:name,...`` hides those names;
``TREADLE_DISABLE_PLUGIN_AUTOLOAD=1`` hides every name a distribution other than treadle
declares (objects passed to ``treadle.Run`` still work). ``treadle plugins`` says what is hidden.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import types
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import importlib_metadata

from treadle.errors import ConfigError, PluginError, PluginLoadError, TreadleError, UnknownNameError

__all__ = [
    "KINDS", "Entry", "adapt", "blocked", "component", "describe", "entries",
    "factory", "import_path", "installed", "instantiate", "jsonable", "load",
    "plugin", "refresh", "split_spec",
]  # fmt: skip

#: the distribution whose names ``TREADLE_DISABLE_PLUGIN_AUTOLOAD`` keeps
FIRST_PARTY = "treadle"
DISABLE = "TREADLE_DISABLE_PLUGINS"
AUTOLOAD_OFF = "TREADLE_DISABLE_PLUGIN_AUTOLOAD"

#: One entry-point group per kind: ``treadle.<kind>``. Components and plugins are chosen by
#: name; every installed ``adapter`` is asked about a ``plugins=`` object that implements no
#: treadle hook (see ``adapt``); a ``command`` is a subcommand of the ``treadle`` CLI
#: (``treadle NAME ARGS...`` calls it with ``ARGS`` and exits with what it returns).
KINDS = (
    "strategy", "precision", "optimizer", "scheduler", "logger", "checkpoint", "store", "plugin",
    "adapter", "command",
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
    """Every installed name of ``kind``, each with the distributions declaring it, less the
    names the environment hides (``blocked``)."""
    return {
        name: kept
        for name, declared in _declared(kind).items()
        if (kept := [e for e in declared if _blocked_by(e) is None])
    }


def blocked() -> list[tuple[Entry, str]]:
    """Every installed name the environment hides, with the variable that hides it."""
    return [
        (entry, why)
        for kind in KINDS
        for name in sorted(_declared(kind))
        for entry in _declared(kind)[name]
        if (why := _blocked_by(entry)) is not None
    ]


def _blocked_by(entry: Entry) -> str | None:
    names = {n.strip() for n in os.environ.get(DISABLE, "").split(",") if n.strip()}
    if entry.name in names or f"{entry.kind}:{entry.name}" in names:
        return f"{DISABLE}={os.environ[DISABLE]}"
    autoload = os.environ.get(AUTOLOAD_OFF, "").strip().lower()
    if autoload not in ("", "0", "false", "no") and entry.distribution != FIRST_PARTY:
        return f"{AUTOLOAD_OFF}={os.environ[AUTOLOAD_OFF]}"
    return None


@functools.cache
def _declared(kind: str) -> dict[str, list[Entry]]:
    if kind not in KINDS:
        raise TreadleError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
    found: dict[str, list[Entry]] = {}
    for point in importlib_metadata.entry_points(group=f"treadle.{kind}"):
        dist, version = (point.dist.name, point.dist.version) if point.dist else ("?", "?")
        entry = Entry(kind, point.name, point.value, dist, version)
        same = found.setdefault(point.name, [])
        # The same distribution can be visible twice (editable install plus a stale copy on
        # sys.path); that is one declaration, not a conflict.
        if all(e.distribution != entry.distribution for e in same):
            same.append(entry)
    return found


def refresh() -> None:
    """Forget cached entry points (after installing or removing a package in-process)."""
    importlib.invalidate_caches()
    entries.cache_clear()
    _declared.cache_clear()


def installed() -> Iterator[Entry]:
    """Every installed name, sorted by kind then name."""
    for kind in KINDS:
        for name in sorted(entries(kind)):
            yield from entries(kind)[name]


def load(kind: str, name: str) -> Any:
    """Import and return the object that the entry point ``name`` of ``kind`` points at."""
    candidates = entries(kind).get(name)
    if not candidates:
        if hidden := [why for e, why in blocked() if (e.kind, e.name) == (kind, name)]:
            raise TreadleError(
                f"{kind} {name!r} is installed but hidden by {hidden[0]}; unset it (or remove "
                f"{name!r} from it) to use {name!r}"
            )
        raise UnknownNameError(kind, name, entries(kind))
    if len(candidates) > 1:
        who = " and ".join(f"{e.distribution} {e.version} ({e.value})" for e in candidates)
        raise TreadleError(
            f"{kind} {name!r} is declared by more than one installed distribution: {who}. "
            f"Uninstall one of them, or pass the {kind} as an object instead of by name."
        )
    entry = candidates[0]
    _check_supported(entry)
    try:
        return importlib_metadata.EntryPoint(entry.name, entry.value, f"treadle.{kind}").load()
    except (Exception, SystemExit) as exc:  # a module calling sys.exit() at import, too
        raise PluginLoadError(kind, name, entry.value, entry.distribution, exc) from exc


def _check_supported(entry: Entry) -> None:
    """Refuse a name whose distribution requires a treadle version other than this one."""
    if entry.distribution in (FIRST_PARTY, "?"):
        return
    from packaging.requirements import InvalidRequirement, Requirement

    from treadle import __version__

    try:
        requires = importlib_metadata.distribution(entry.distribution).requires or []
    except importlib_metadata.PackageNotFoundError:
        return
    for line in requires:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        ours = requirement.name.lower() == FIRST_PARTY and requirement.marker is None
        if ours and not requirement.specifier.contains(__version__, prereleases=True):
            raise TreadleError(
                f"{entry.kind} {entry.name!r} comes from {entry.distribution} "
                f"{entry.version}, which supports treadle{requirement.specifier}, but treadle "
                f"{__version__} is installed. Install a version of {entry.distribution} that "
                f"supports treadle {__version__}, or a treadle it supports."
            )


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


# ------------------------------------------------------------------ building from specs


#: the values a description keeps as they are (anything else is shown by its ``repr``)
_PLAIN = str | int | float | bool | None


def describe(spec: Any) -> Any:
    if isinstance(spec, _PLAIN):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2:
        factory, options = spec
        return {"name": getattr(factory, "__name__", str(factory)), **jsonable(options)}
    if isinstance(spec, Mapping):
        return jsonable(spec)
    return type(spec).__name__


def jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, _PLAIN) else repr(v) for k, v in options.items()}


def split_spec(kind: str, spec: Any) -> tuple[str, dict[str, Any]] | None:
    """``"name"`` or ``{"name": ..., **options}`` → (name, options); anything else → None."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"a {kind} given as a mapping needs a 'name' key, got {dict(spec)!r}")
        return name, options
    return None


def instantiate(kind: str, name: str, target: Any, options: Mapping[str, Any]) -> Any:
    allowed = "?"  # when ``target`` has no signature
    try:
        signature = inspect.signature(target)
        allowed = ", ".join(p for p in signature.parameters if p not in ("self", "args", "kwargs"))
        signature.bind(**options)
    except TypeError as exc:
        raise ConfigError(
            f"{kind} {name!r}: invalid options {sorted(options)}: {exc}. "
            f"Allowed options: {allowed or 'none'}"
        ) from None
    except ValueError:
        pass  # no signature to check (a builtin): the call below says what is wrong
    try:
        return target(**options)
    except TreadleError:
        raise  # already names what to fix
    except Exception as exc:
        shown = f" with options {jsonable(options)}" if options else ""
        message = f"building it{shown} raised {type(exc).__name__}: {exc}"
        if kind == "plugin":
            raise PluginError(name, "__init__", message) from exc
        raise ConfigError(f"{kind} {name!r}: {message}") from exc


def component(kind: str, spec: Any, base: type) -> Any:
    if (split := split_spec(kind, spec)) is None:
        if isinstance(spec, base):
            return spec
        raise ConfigError(
            f"{kind} must be a name, a {{'name': ..., **options}} mapping or a "
            f"{base.__module__}.{base.__qualname__} instance; got {type(spec).__name__}"
        )
    name, options = split
    built = instantiate(kind, name, load(kind, name), options)
    if not isinstance(built, base):
        raise TreadleError(
            f"{kind} {name!r} built a {type(built).__name__}, which is not a {base.__qualname__}"
        )
    return built


def factory(kind: str, spec: Any, instance_type: type) -> Any:
    """Optimizer / scheduler: resolved to (factory, options) now, built at fit."""
    if (split := split_spec(kind, spec)) is not None:
        name, options = split
        return load(kind, name), options
    if isinstance(spec, instance_type) and instance_type is not object:
        return spec
    if callable(spec):
        return spec, {}
    if instance_type is object and hasattr(spec, "step"):
        return spec
    raise ConfigError(
        f"{kind} must be a name, a {{'name': ..., **options}} mapping, an instance or a "
        f"callable; got {type(spec).__name__}"
    )


def plugin(spec: Any) -> tuple[object, str]:
    if (split := split_spec("plugin", spec)) is not None:
        name, options = split
        target = load("plugin", name)
        if isinstance(target, type):
            return instantiate("plugin", name, target, options), name
        if options:
            raise ConfigError(
                f"plugin {name!r} is a module and takes no options, got {sorted(options)}"
            )
        return target, name
    if isinstance(spec, types.ModuleType):
        return spec, spec.__name__
    if isinstance(spec, type):
        raise ConfigError(
            f"plugin {spec.__qualname__} is a class: pass an instance, {spec.__qualname__}(...)"
        )
    return spec, getattr(spec, "name", None) or type(spec).__name__


def import_path(path: str) -> Any:
    """Resolve ``"package.module:attribute"`` (the attribute may be dotted): the one way a name
    written in configuration (a run file, a plugin option) becomes code.

    Raises:
        ConfigError: ``path`` is not of that form, or the module or attribute does not exist.
    """
    if not isinstance(path, str):
        raise ConfigError(
            f"expected an import path 'package.module:attribute', got {type(path).__name__} "
            f"{path!r}"
        )
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{path!r} is not an import path of the form 'package.module:attribute'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} (from {path!r}): {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(
                f"{module_name!r} has no attribute {attribute!r} (from {path!r})"
            ) from None
    return target
