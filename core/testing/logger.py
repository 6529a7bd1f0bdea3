"""The logger conformance suite: ``class TestMine(LoggerConformance): logger = Mine``.

It runs short fits with the logger and watches the calls the ``treadle.Logger`` base makes:
``start`` once before the first ``log``, ``log(metrics, step)`` at every logging step with plain
numbers, ``finish`` once at the end (also when the fit fails), and all of it again when the run
fits again.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import pytest

from treadle.components import Logger
from treadle.hookspecs import hookimpl
from treadle.testing._fit import fresh, make_run, required, scratch

__all__ = ["LoggerConformance"]


def _build(spec: Any) -> Logger:
    from treadle.registry import component as build

    component = build("logger", fresh(spec), Logger)
    assert isinstance(component, Logger)
    return component


def _spy(logger: Logger, calls: list[tuple[str, Any]]) -> None:
    """Record the calls to ``start``, ``log`` and ``finish`` in ``calls`` (they still run)."""

    def wrap(name: str, record: Callable[..., Any]) -> None:
        method = getattr(logger, name)

        def spy(*args: Any) -> Any:
            calls.append((name, record(*args)))
            return method(*args)

        setattr(logger, name, spy)

    wrap("start", lambda run: None)
    wrap("log", lambda metrics, step: (dict(metrics), step))
    wrap("finish", lambda: None)


class _FailAt:
    @hookimpl
    def on_step_end(self, run: Any) -> None:
        if run.state.step == 3:
            raise RuntimeError("conformance: a failure inside the fit")


class LoggerConformance:
    """Subclass it in a test module; pytest collects every ``test_`` method.

    Class attributes:
        logger: the logger: a class or zero-argument factory, an entry-point name, or a
            ``{"name": ..., **options}`` mapping. Its files go to the run's ``output_dir``
            (a temporary directory).
    """

    logger: ClassVar[Any] = None

    def _fit(
        self, calls: list[tuple[str, Any]], *, plugins: list[Any] | None = None, fits: int = 1
    ) -> None:
        logger = _build(required(self, "logger"))
        _spy(logger, calls)
        components = {"loggers": [logger], "plugins": plugins or []}
        with scratch() as root:
            run = make_run(root, max_steps=4, log_every=1, components=components)
            with run:
                for number in range(fits):
                    run.fit(max_steps=4 * (number + 1))

    def test_is_a_logger_with_a_name(self) -> None:
        logger = _build(required(self, "logger"))
        assert isinstance(logger, Logger), f"{logger!r} is not a treadle.Logger"
        assert isinstance(logger.name, str) and logger.name, "set the class attribute name"

    def test_start_log_finish_in_order(self) -> None:
        calls: list[tuple[str, Any]] = []
        self._fit(calls)
        names = [name for name, _ in calls]
        assert names[0] == "start" and names[-1] == "finish", names
        assert names.count("start") == 1 and names.count("finish") == 1, names
        logged = [value for name, value in calls if name == "log"]
        assert [step for _, step in logged] == [1, 2, 3, 4], logged
        for metrics, _ in logged:
            assert isinstance(metrics, Mapping) and "loss" in metrics, metrics
            for key, value in metrics.items():
                assert isinstance(key, str) and isinstance(value, numbers.Real), (key, value)

    def test_finish_is_called_when_the_fit_fails(self) -> None:
        calls: list[tuple[str, Any]] = []
        with pytest.raises(Exception, match="conformance: a failure"):
            self._fit(calls, plugins=[_FailAt()])
        names = [name for name, _ in calls]
        assert names.count("finish") == 1 and names[-1] == "finish", (
            f"finish must be called once when the fit fails; the calls were {names}"
        )

    def test_a_second_fit_starts_again(self) -> None:
        calls: list[tuple[str, Any]] = []
        self._fit(calls, fits=2)
        names = [name for name, _ in calls]
        assert names.count("start") == 2 and names.count("finish") == 2, names
        assert names.index("finish") < names.index("start", 1), names
