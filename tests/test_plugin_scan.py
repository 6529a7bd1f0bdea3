"""Every installed component survives being registered by any supported pluggy.

pluggy before 1.7 finds hook implementations with ``getattr(plugin, name)`` for every name in
``dir(plugin)``, which runs properties; a property that raises (e.g. "no engine yet") then
breaks ``treadle.Run`` at compose time. pluggy 1.7 reads attributes statically, which hid
exactly that bug here while the GPU machine's older pluggy hit it.
"""

from __future__ import annotations

import inspect
from typing import Any

import pluggy
import pytest

from treadle import hookspecs, registry
from treadle.errors import ConfigError, MissingDependencyError

KINDS = ("strategy", "precision", "logger", "checkpoint", "plugin")


def _build(kind: str, name: str) -> Any:
    factory = registry.load(kind, name)
    if not callable(factory) or inspect.ismodule(factory):
        return factory
    try:
        parameters = inspect.signature(factory).parameters
        return factory(device="cpu") if kind == "strategy" and "device" in parameters else factory()
    except (ConfigError, MissingDependencyError, TypeError) as exc:
        pytest.skip(f"{kind} {name!r} cannot be built with its defaults here: {exc}")


class OldPluginManager(pluggy.PluginManager):
    """``parse_hookimpl_opts`` as pluggy 1.5 and 1.6 have it."""

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        method: object = getattr(plugin, name)
        if not inspect.isroutine(method):
            return None
        try:
            return getattr(method, self.project_name + "_impl", None)
        except Exception:
            return {}


@pytest.mark.parametrize(
    ("kind", "name"),
    [(kind, name) for kind in KINDS for name in sorted(registry.entries(kind))],
)
def test_reading_every_attribute_of_a_fresh_component_does_not_raise(kind: str, name: str) -> None:
    component = _build(kind, name)
    for attribute in dir(component):
        getattr(component, attribute)  # what pluggy < 1.7 does on register
    manager = OldPluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(component)


def test_the_old_scan_catches_a_raising_property() -> None:
    class Raises:
        @property
        def engine(self) -> Any:
            raise RuntimeError("no engine yet")

    manager = OldPluginManager(hookspecs.PROJECT)
    with pytest.raises(RuntimeError, match="no engine yet"):
        manager.register(Raises())
