"""``compile``: ``torch.compile`` of the model, and optionally of the optimizer step.

At the start of the first ``fit``, after the strategy has placed and wrapped the model (DDP,
FSDP: the order PyTorch recommends), the plugin compiles ``run.wrapped_model`` **in place** with
``nn.Module.compile``: the module object, its ``state_dict`` keys and everything that holds it
stay the same, only its ``__call__`` goes through the compiled function. Checkpoints, export
and ``run.model`` therefore keep the original parameter names (no ``_orig_mod.`` prefix): a
checkpoint written by a compiled run loads into a plain model, and a compiled run resumes from
a plain one's checkpoint. Training, evaluation and prediction all call the compiled module.
It is compiled once per ``Run``; a second ``fit`` reuses it.

Options:

* ``mode`` (str | None, default None): inductor's mode, one of ``"default"``,
  ``"reduce-overhead"`` (CUDA graphs), ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``;
  only with the ``inductor`` backend.
* ``backend`` (str | callable, default ``"inductor"``): a name from
  ``torch._dynamo.list_backends(exclude_tags=())`` (``"eager"`` and ``"aot_eager"`` check
  that a model traces without compiling kernels), a compiler function, or an import path
  ``"pkg.module:backend"``.
* ``fullgraph`` (bool, default False): fail on the first graph break instead of splitting.
* ``dynamic`` (bool | None, default None): None lets dynamo mark a dimension dynamic after it
  changed once; True compiles for dynamic shapes from the start; False never does.
* ``compile_optimizer`` (bool, default False): compile the optimizer's ``step`` too (PyTorch's
  "compiled optimizer" recipe: one fused kernel for the whole update instead of a loop over
  parameters; mostly a GPU gain, and its first compilation is long on a CPU). A learning-rate
  scheduler changes ``lr`` every step: dynamo recompiles the step once, then treats ``lr`` as
  a dynamic value (no recompilation after that; a tensor ``lr`` is not needed).
* ``report`` (bool, default True): report graph breaks and recompilations (below).

Report: after the first optimizer step, a ``TreadleWarning`` names the graph breaks (count and
reasons) if there are any; at the end of the first ``fit``, another names the recompilations
(with dynamo's reason: a new shape, ``no_grad`` in evaluation ...) if any happened, and one
``run.log`` record carries ``compile/graph_breaks``, ``compile/recompiles``,
``compile/graphs`` (graphs compiled) and ``compile/compile_time_s`` (dynamo's own count of
time spent compiling). The counts are dynamo's process-wide counters, taken as differences
from the moment of compiling, so they include anything else compiled in the process meanwhile.

Strategies: compiling in place suits every strategy whose wrapped model is an ``nn.Module``
called by the loop (single device, DDP, FSDP, Accelerate). A strategy whose engine defines
its own ``compile`` (DeepSpeed's ``DeepSpeedEngine.compile``, configured through DeepSpeed's
``"compile"`` section) is refused with an error naming that route: two compilers of one
module would fight over it.

Equivalents: HF Trainer ``torch_compile=True``, ``torch_compile_backend``,
``torch_compile_mode``; Lightning: ``torch.compile(model)`` before ``trainer.fit``.

Example::

    run = treadle.Run(model, data, plugins=[{"name": "compile", "mode": "max-autotune"}])
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from treadle.errors import ConfigError, TreadleWarning
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["Compile", "CompileReport"]

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: strategies whose engine compiles through its own API (checked again, generically, at fit)
ENGINES = ("deepspeed",)


def _engine_message(strategy: str, wrapper: str) -> str:
    return (
        f"plugin 'compile' cannot be used with strategy {strategy!r}: its {wrapper} has its own "
        "compile(), and two compilers of one module would fight over it; compile through the "
        "strategy's configuration instead (DeepSpeed: the 'compile' section of its config) and "
        "drop the compile plugin"
    )


def _known_backends() -> list[str]:
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def _check_backend(backend: Any) -> str | Callable[..., Any]:
    if callable(backend):
        return backend  # type: ignore[no-any-return]
    if not isinstance(backend, str) or not backend:
        raise ConfigError(
            f"compile option backend = {backend!r} is not allowed: expected a backend name, "
            "a compiler function or an import path 'pkg.module:function'"
        )
    if ":" in backend:
        from treadle.registry import import_path

        loaded = import_path(backend)
        if not callable(loaded):
            raise ConfigError(f"compile option backend = {backend!r} is not a callable")
        return loaded  # type: ignore[no-any-return]
    known = _known_backends()
    if backend not in known:
        raise ConfigError(
            f"compile option backend = {backend!r} is not a torch.compile backend; "
            f"installed ones: {', '.join(known)}"
        )
    return backend


def _check_bool(option: str, value: Any, allow_none: bool = False) -> None:
    if isinstance(value, bool) or (allow_none and value is None):
        return
    allowed = "True, False or None" if allow_none else "True or False"
    raise ConfigError(f"compile option {option} = {value!r} is not allowed: expected {allowed}")


def _short(reason: str, limit: int = 160) -> str:
    """The first line of one of dynamo's multi-line reasons, cut to ``limit`` characters."""
    line = reason.strip().splitlines()[0] if reason.strip() else "(no reason given)"
    return line if len(line) <= limit else line[: limit - 3] + "..."


class CompileReport:
    """Dynamo's counters since a snapshot: graph breaks, recompilations, graphs, compile time."""

    def __init__(self) -> None:
        from torch._dynamo.utils import counters, get_compilation_metrics

        self._breaks = Counter(counters["graph_break"])
        self._graphs = counters["stats"]["unique_graphs"]
        # the records themselves are kept, so that no id seen here is reused by a new record
        self._before = list(get_compilation_metrics())
        self._seen = {id(m) for m in self._before}

    def graph_breaks(self) -> Counter[str]:
        from torch._dynamo.utils import counters

        now = Counter(counters["graph_break"])
        now.subtract(self._breaks)
        return Counter({_short(k): v for k, v in now.items() if v > 0})

    def graphs(self) -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"] - self._graphs)

    def _compilations(self) -> list[Any]:
        from torch._dynamo.utils import get_compilation_metrics

        return [m for m in get_compilation_metrics() if id(m) not in self._seen]

    def recompile_reasons(self) -> list[str]:
        """Dynamo's reason for each frame compiled again because a guard failed."""
        return [_short(m.recompile_reason) for m in self._compilations() if m.recompile_reason]

    def compile_time_s(self) -> float:
        return float(sum(m.entire_frame_compile_time_s or 0.0 for m in self._compilations()))


def _describe(counts: Counter[str] | list[str]) -> str:
    items = counts.most_common() if isinstance(counts, Counter) else Counter(counts).most_common()
    return "; ".join(f"{reason} (x{n})" if n > 1 else reason for reason, n in items)


class Compile:
    """``torch.compile`` of the wrapped model, in place, and optionally of the optimizer step.

    Args:
        mode: inductor's mode (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``) or None.
        backend: a ``torch.compile`` backend name, a compiler function, or an import path.
        fullgraph: raise on a graph break instead of splitting the graph.
        dynamic: dynamic shapes: None (automatic), True or False.
        compile_optimizer: compile ``optimizer.step`` as well.
        report: warn about graph breaks and recompilations and log their counts, once.
    """

    name: ClassVar[str] = "compile"

    def __init__(
        self,
        mode: str | None = None,
        backend: str | Callable[..., Any] = "inductor",
        fullgraph: bool = False,
        dynamic: bool | None = None,
        compile_optimizer: bool = False,
        report: bool = True,
    ) -> None:
        if mode is not None and mode not in MODES:
            raise ConfigError(
                f"compile option mode = {mode!r} is not allowed: expected one of "
                f"{', '.join(map(repr, MODES))} or None"
            )
        self.backend = _check_backend(backend)
        if mode is not None and self.backend != "inductor":
            raise ConfigError(
                f"compile option mode = {mode!r} needs backend='inductor' (backend is "
                f"{backend!r}); drop mode or use the inductor backend"
            )
        _check_bool("fullgraph", fullgraph)
        _check_bool("dynamic", dynamic, allow_none=True)
        _check_bool("compile_optimizer", compile_optimizer)
        _check_bool("report", report)
        self.mode, self.fullgraph, self.dynamic = mode, fullgraph, dynamic
        self.compile_optimizer, self.report = compile_optimizer, report
        self._compiled: nn.Module | None = None  # the module compiled, once per Run
        self._report: CompileReport | None = None
        self._first_step_reported = False
        self._fit_reported = False

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "backend": self.backend,
            "fullgraph": self.fullgraph,
            "dynamic": self.dynamic,
        }
        if self.mode is not None:
            options["mode"] = self.mode
        return options

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_init_end(self, run: Run) -> None:
        # known at compose time for the one first-party engine: say so before any compute
        if run.strategy.name in ENGINES:
            raise ConfigError(_engine_message(run.strategy.name, "engine"))

    @hookimpl
    def on_fit_begin(self, run: Run) -> None:
        model = run.wrapped_model
        if self._compiled is model:
            return  # fit again: already compiled
        if type(model).compile is not nn.Module.compile:
            raise ConfigError(_engine_message(run.strategy.name, type(model).__name__))
        self._report = CompileReport()
        model.compile(**self._options())
        if self.compile_optimizer and run.optimizer is not None:
            _compile_step(run.optimizer, self._options())
        self._compiled = model
        self._first_step_reported = self._fit_reported = False

    @hookimpl
    def on_step_end(self) -> None:
        if self._first_step_reported or self._report is None:
            return
        self._first_step_reported = True
        if not self.report:
            return
        breaks = self._report.graph_breaks()
        if breaks:
            warnings.warn(
                f"compile: {sum(breaks.values())} graph break(s) in the first step, each a "
                f"return to Python between compiled graphs: {_describe(breaks)}",
                TreadleWarning,
                stacklevel=2,
            )

    @hookimpl
    def on_fit_end(self, run: Run) -> None:
        if self._fit_reported or self._report is None or not self.report:
            return
        self._fit_reported = True
        report = self._report
        reasons = report.recompile_reasons()
        if reasons:
            warnings.warn(
                f"compile: {len(reasons)} recompilation(s) during fit: {_describe(reasons)}",
                TreadleWarning,
                stacklevel=2,
            )
        run.log(
            {
                "compile/graph_breaks": sum(report.graph_breaks().values()),
                "compile/recompiles": len(reasons),
                "compile/graphs": report.graphs(),
                "compile/compile_time_s": report.compile_time_s(),
            }
        )


def _compile_step(optimizer: torch.optim.Optimizer, options: dict[str, Any]) -> None:
    """Replace ``optimizer.step`` by a compiled call of its class's ``step``.

    A learning-rate scheduler has already replaced ``optimizer.step`` by a wrapper that
    records the call; dynamo refuses to trace that wrapper (its file is on dynamo's skip
    list), which would leave the whole update eager. So the class's own ``step`` is compiled
    and the record the scheduler reads is kept here (else it warns that the scheduler stepped
    before the optimizer).
    """
    previous = optimizer.step
    compiled = torch.compile(functools.partial(type(optimizer).step, optimizer), **options)
    records_call = hasattr(previous, "_wrapped_by_lr_sched")

    @functools.wraps(type(optimizer).step)
    def step(*args: Any, **kwargs: Any) -> Any:
        if records_call:
            optimizer._opt_called = True  # type: ignore[attr-defined]
        return compiled(*args, **kwargs)

    if records_call:
        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = step  # type: ignore[method-assign]
