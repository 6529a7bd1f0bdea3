"""The callback conformance suite: ``class TestMine(CallbackConformance): plugin = Mine``.

A callback (entry-point group ``treadle.plugin``) is any object or module with
``@treadle.hookimpl`` functions. The suite checks that it implements at least one hook, that
every hook it implements exists and takes only arguments the hook passes, that a short fit with
evaluation and a save runs with it, and that such a run resumes bit for bit (state kept
through ``on_save_checkpoint`` / ``on_load_checkpoint``).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import pluggy

from treadle import hookspecs
from treadle.testing._fit import check_resume_exact, make_run, required, scratch

__all__ = ["CallbackConformance", "implemented_hooks"]


def _resolve(spec: Any) -> Any:
    """A fresh plugin object: a class or factory is called, a module or object used as is."""
    from treadle import registry

    if isinstance(spec, str):
        spec = registry.load("plugin", spec)
    if isinstance(spec, dict):
        target = registry.load("plugin", spec["name"])
        return target(**{k: v for k, v in spec.items() if k != "name"})
    if isinstance(spec, type) or (callable(spec) and not implemented_hooks(spec)):
        return spec()  # a class or a factory (function, functools.partial)
    return spec  # a module or an object with hook implementations


def implemented_hooks(plugin: Any) -> dict[str, list[str]]:
    """Each ``@treadle.hookimpl`` function of ``plugin`` and the argument names it takes."""
    marker = f"{hookspecs.PROJECT}_impl"
    found: dict[str, list[str]] = {}
    for name in dir(plugin):
        function = getattr(plugin, name, None)
        if callable(function) and hasattr(function, marker):
            found[name] = list(inspect.signature(function).parameters)
    return found


class CallbackConformance:
    """Subclass it in a test module; pytest collects every ``test_`` method.

    Class attributes:
        plugin: the callback: a class or zero-argument factory, a module or object (used as
            it is), an entry-point name, or a ``{"name": ..., **options}`` mapping.
        resumable: the run with it resumes bit for bit (``True``); a callback that ends
            training early on purpose may set False, with a reason in a comment.
    """

    plugin: ClassVar[Any] = None
    resumable: ClassVar[bool] = True

    def _new(self) -> Any:
        return _resolve(required(self, "plugin"))

    def test_implements_real_hooks_with_real_arguments(self) -> None:
        hooks = implemented_hooks(self._new())
        assert hooks, "no @treadle.hookimpl function: the plugin would do nothing"
        for name, arguments in hooks.items():
            spec = getattr(hookspecs, name, None)
            known = hasattr(spec, f"{hookspecs.PROJECT}_spec")
            assert spec is not None and known, f"{name} is not a treadle hook"
            allowed = set(inspect.signature(spec).parameters)
            unknown = [a for a in arguments if a not in allowed]
            assert not unknown, (
                f"{name} takes {unknown}, which the hook does not pass; it passes {sorted(allowed)}"
            )

    def test_registers_with_pluggy(self) -> None:
        manager = pluggy.PluginManager(hookspecs.PROJECT)
        manager.add_hookspecs(hookspecs)
        manager.register(self._new())  # raises PluginValidationError on a wrong signature

    def test_a_short_fit_with_eval_and_save(self) -> None:
        with scratch() as root:
            run = make_run(
                root, max_steps=4, eval_every=2, save_at_end=True,
                components={"plugins": [self._new()]},
            )  # fmt: skip
            with run:
                run.fit()
                run.evaluate()
            assert (root / "checkpoints").is_dir(), "the run saved no checkpoint"

    def test_resumes_bit_for_bit(self) -> None:
        if not self.resumable:
            import pytest

            pytest.skip("resumable = False")
        check_resume_exact(lambda: {"plugins": [self._new()]})
