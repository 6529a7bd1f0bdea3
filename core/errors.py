"""The exceptions and warnings treadle raises: one base class, each message names what to fix."""

from __future__ import annotations

import difflib
import signal
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "CheckpointError", "ConfigError", "MissingDependencyError", "PluginError",
    "PluginLoadError", "Preempted", "TreadleError", "TreadleWarning", "UnknownNameError",
    "require",
]  # fmt: skip


class TreadleError(Exception):
    """Base class of every error treadle raises on purpose."""


class TreadleWarning(UserWarning):
    """Base class of every warning treadle emits."""


class ConfigError(TreadleError, ValueError):
    """A value given to a run (config field, component option, argument) is not allowed."""


class CheckpointError(TreadleError):
    """A checkpoint on disk is damaged, hostile or unreadable; the message names the file and
    the field. ``resume="auto"`` skips such a checkpoint (with a warning saying why) in favour
    of the newest one that verifies."""


class UnknownNameError(TreadleError, LookupError):
    """A component was asked for by a name that no installed distribution provides."""

    def __init__(self, kind: str, name: str, installed: Iterable[str]) -> None:
        self.kind, self.name, self.installed = kind, name, sorted(installed)
        close = difflib.get_close_matches(name, self.installed, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        listing = ", ".join(self.installed) or "none"
        super().__init__(
            f"unknown {kind} {name!r}.{hint} Installed {kind} names: {listing}. "
            f"A third-party {kind} becomes available by installing the package that declares "
            f'it in the entry-point group "treadle.{kind}".'
        )


class PluginLoadError(TreadleError, ImportError):
    """An installed entry point could not be imported; only runs that ask for it fail."""

    def __init__(self, kind: str, name: str, value: str, distribution: str, cause: BaseException):
        self.kind, self.name, self.distribution = kind, name, distribution
        if isinstance(cause, SystemExit):  # sys.exit() at import: the run must not just end
            what = f"called sys.exit({cause.code!r}) while being imported"
        else:
            what = f"failed to import: {type(cause).__name__}: {cause}"
        super().__init__(
            f"{kind} {name!r} (entry point {value!r} of distribution {distribution!r}) {what}. "
            f"Reinstall or uninstall {distribution!r}, or run without {kind} {name!r}."
        )


class MissingDependencyError(TreadleError, ImportError):
    """A plugin needs an optional library that is not installed."""

    def __init__(self, what: str, module: str, extra: str, distribution: str = "treadle") -> None:
        self.module, self.extra, self.distribution = module, extra, distribution
        super().__init__(
            f"{what} needs the optional library {module!r}, which is not installed. "
            f'Install it with: pip install "{distribution}[{extra}]" -c constraints.txt'
        )


class PluginError(TreadleError):
    """A plugin misbehaved: a hook implementation raised, or does not match any hook."""

    def __init__(self, plugin: str, hook: str, message: str) -> None:
        self.plugin, self.hook = plugin, hook
        super().__init__(f"plugin {plugin!r}, hook {hook!r}: {message}")


class Preempted(SystemExit):
    """Raised by ``Run.fit`` after SIGTERM or SIGINT: the step finished and a checkpoint was saved.

    A ``SystemExit``: uncaught, it ends the process without a traceback, with exit code
    128 + the signal's number (143 for SIGTERM, 130 for SIGINT), on every rank (a rank that
    learned of the signal from another one exits with 143).

    Attributes:
        signal: the signal received.
        checkpoint: the checkpoint saved before stopping (None with ``checkpoint=None``).
    """

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(128 + int(signum))
        self.signal, self.checkpoint = signal.Signals(signum), checkpoint


def require(module: str, *, extra: str, what: str, distribution: str = "treadle") -> object:
    """Import an optional dependency, or fail with the exact install command
    (``pip install "DISTRIBUTION[EXTRA]"``: a plugin package names its own distribution)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(what, module, extra, distribution) from exc
