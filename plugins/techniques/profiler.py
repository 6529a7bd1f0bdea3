"""``profiler``: ``torch.profiler`` over a chosen window of optimizer steps, as a trace file.

The profiler starts with each ``fit()`` and is stepped at every optimizer step
(``on_step_end``), so its schedule counts optimizer steps (all micro-batches of a step, the
backward and the optimizer update are inside one profiled step). Each recorded window is
written by ``torch.profiler.tensorboard_trace_handler`` into ``OUTPUT/profiler/`` (``OUTPUT``
is ``Config.output_dir``) as ``rank<R>.<time_ns>.pt.trace.json``: Chrome-trace JSON, which
Perfetto (https://ui.perfetto.dev) and ``chrome://tracing`` open as is, and which TensorBoard
shows with the ``torch-tb-profiler`` plugin (``tensorboard --logdir OUTPUT/profiler``).

Choosing the window, one of two ways:

* **a schedule** (``torch.profiler.schedule``): ``skip_first`` steps ignored, then cycles of
  ``wait`` idle steps, ``warmup`` steps traced but discarded (the first traced step carries
  the profiler's start-up cost) and ``active`` recorded steps, ``repeat`` times (0: until the
  fit ends; one trace file per cycle). Counted from the first step of each ``fit()``.
* **absolute steps**: ``start_step`` (the ``run.state.step`` at which the first recorded step
  begins, counting from 0) and ``steps`` (how many). One step before it is used as warm-up when
  the fit has one. Survives resume: a run resumed past the window does not profile it again.

Every recorded step is also labelled ``treadle/step <N>`` (N = ``run.state.step`` as the step
began) in the trace, next to torch's own ``ProfilerStep#<k>``. The label runs from the end of
the previous step to the end of this one, so it includes the previous step's log, evaluation
and checkpoint work, which happen at that boundary (a fit stopped by a plugin's request leaves
one last short label holding only the end-of-fit work).

Decisions:

* Every rank writes its own trace, with its rank in the file name (stragglers and collective
  waits are only visible per rank); ``all_ranks=False`` profiles the main process only.
* Outside the window nothing is recorded; the per-step cost there is one ``prof.step()``.
* The profiler is stopped at the end of ``fit`` and when an exception escapes it; a window cut
  short (the fit stopped, or failed, inside it) is still written, with the steps it recorded.
* A window that cannot occur in a fit (it starts at or after the fit's last step, or ended
  before the fit's first) is a ``TreadleWarning`` at the start of the fit, and a fit that
  wrote no trace is one at its end: a profiler that silently profiles nothing is a trap.
* One line per trace names the file (on stderr); ``table_rows > 0`` adds torch's
  ``key_averages()`` table of the top operators by self time.

Options (all keyword):

* ``wait`` (int, 1), ``warmup`` (int, 1), ``active`` (int, 3), ``repeat`` (int, 1),
  ``skip_first`` (int, 0): the schedule, as ``torch.profiler.schedule``.
* ``start_step`` (int | None, None), ``steps`` (int | None, None): the absolute window
  instead; ``steps`` defaults to ``active`` when only ``start_step`` is given. Cannot be
  combined with the schedule options.
* ``activities`` (list of ``"cpu"``/``"cuda"`` | None, None): None profiles the CPU, and
  CUDA when the run's device is a CUDA device.
* ``record_shapes``, ``profile_memory``, ``with_stack`` (bool, False): as ``torch.profiler``.
* ``table_rows`` (int, 0): rows of the top-operators table printed per trace (0: none).
* ``sort_by`` (str | None, None): the table's ordering key; None: ``self_cuda_time_total``
  when CUDA is profiled, else ``self_cpu_time_total``.
* ``all_ranks`` (bool, True): every rank writes a trace; False: the main process only.
* ``out_dir`` (str | None, None): where traces go; None: ``OUTPUT/profiler``.

Equivalents: the HF Trainer has none (users wrap ``trainer.train()`` in
``torch.profiler.profile`` and a ``TrainerCallback`` calling ``prof.step()``); Lightning's
``Trainer(profiler=PyTorchProfiler(schedule=..., export_to_chrome=True))``.

Example::

    run = treadle.Run(model, data, config=treadle.Config(max_steps=20),
                      plugins=[{"name": "profiler", "wait": 2, "warmup": 1, "active": 3,
                                "table_rows": 10}])
    run.fit()   # OUTPUT/profiler/rank0.<time>.pt.trace.json: open it in ui.perfetto.dev
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from treadle.errors import ConfigError, TreadleWarning
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch.profiler

    from treadle.run import Run

__all__ = ["Profiler"]

_ACTIVITIES = ("cpu", "cuda")
_SCHEDULE_DEFAULTS = {"wait": 1, "warmup": 1, "active": 3, "repeat": 1, "skip_first": 0}


def _invalid(option: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"profiler option {option} = {value!r} is not allowed: {allowed}")


def _count(option: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _invalid(option, value, f"expected an integer >= {minimum}")
    return value


def _flag(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _invalid(option, value, "expected True or False")
    return value


def _say(text: str) -> None:
    """One line for the user; a closed stream (a dead pipe) must never stop a run."""
    with contextlib.suppress(OSError, ValueError):
        print(f"treadle profiler: {text}", file=sys.stderr, flush=True)


class Profiler:
    """Profile a window of optimizer steps with ``torch.profiler``; see the module docstring.

    Args:
        wait, warmup, active, repeat, skip_first: the ``torch.profiler.schedule`` window,
            counted in optimizer steps from the start of each ``fit()``.
        start_step: the ``run.state.step`` of the first recorded step, instead of a schedule.
        steps: how many steps to record from ``start_step``.
        activities: ``["cpu"]``, ``["cpu", "cuda"]`` ...; None: CPU, plus CUDA on a CUDA device.
        record_shapes, profile_memory, with_stack: passed to ``torch.profiler.profile``.
        table_rows: print a ``key_averages()`` table of this many rows per trace (0: none).
        sort_by: the table's sort key (None: self CUDA time if profiled, else self CPU time).
        all_ranks: every rank writes its trace (True) or only the main process (False).
        out_dir: the trace directory; None: ``<output_dir>/profiler``.
    """

    name: ClassVar[str] = "profiler"

    def __init__(
        self,
        *,
        wait: int | None = None,
        warmup: int | None = None,
        active: int | None = None,
        repeat: int | None = None,
        skip_first: int | None = None,
        start_step: int | None = None,
        steps: int | None = None,
        activities: list[str] | tuple[str, ...] | None = None,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
        table_rows: int = 0,
        sort_by: str | None = None,
        all_ranks: bool = True,
        out_dir: str | None = None,
    ) -> None:
        given = {
            "wait": wait,
            "warmup": warmup,
            "active": active,
            "repeat": repeat,
            "skip_first": skip_first,
        }
        schedule_given = sorted(k for k, v in given.items() if v is not None)
        if start_step is None and steps is not None:
            raise _invalid("steps", steps, "it needs start_step (the first step to record)")
        if start_step is not None and schedule_given:
            raise ConfigError(
                f"profiler: start_step cannot be combined with {', '.join(schedule_given)}: "
                "choose the window either as start_step/steps or as a schedule "
                "(wait/warmup/active/repeat/skip_first)"
            )
        self.start_step = None if start_step is None else _count("start_step", start_step, 0)
        self.steps = _count("steps", steps, 1) if steps is not None else None
        values = {k: _SCHEDULE_DEFAULTS[k] if v is None else v for k, v in given.items()}
        self.wait = _count("wait", values["wait"], 0)
        self.warmup = _count("warmup", values["warmup"], 0)
        self.active = _count("active", values["active"], 1)
        self.repeat = _count("repeat", values["repeat"], 0)
        self.skip_first = _count("skip_first", values["skip_first"], 0)
        if self.start_step is not None and self.steps is None:
            self.steps = self.active
        if activities is not None:
            if not isinstance(activities, list | tuple):
                raise _invalid("activities", activities, "expected a list such as ['cpu', 'cuda']")
            unknown = [a for a in activities if a not in _ACTIVITIES]
            if unknown or not activities:
                raise _invalid(
                    "activities", activities, f"expected a non-empty list of {_ACTIVITIES}"
                )
        self.activities = None if activities is None else list(dict.fromkeys(activities))
        self.record_shapes = _flag("record_shapes", record_shapes)
        self.profile_memory = _flag("profile_memory", profile_memory)
        self.with_stack = _flag("with_stack", with_stack)
        self.table_rows = _count("table_rows", table_rows, 0)
        if sort_by is not None and (not isinstance(sort_by, str) or not sort_by):
            raise _invalid(
                "sort_by", sort_by, "expected a key_averages column, e.g. 'cpu_time_total'"
            )
        self.sort_by = sort_by
        self.all_ranks = _flag("all_ranks", all_ranks)
        if out_dir is not None and (not isinstance(out_dir, str) or not out_dir):
            raise _invalid("out_dir", out_dir, "expected a directory path or None")
        self.out_dir = out_dir
        #: every trace file written, over the run's life, in order.
        self.traces: list[Path] = []
        self._profiler: torch.profiler.profile | None = None
        self._label: Any = None  # the open record_function of the current step
        self._traces_this_fit = 0
        self._window_words = ""

    def __repr__(self) -> str:
        return f"Profiler({self._describe_window()})"

    # ------------------------------------------------------------------ the window

    def _describe_window(self) -> str:
        if self.start_step is not None:
            return f"start_step={self.start_step}, steps={self.steps}"
        return (
            f"wait={self.wait}, warmup={self.warmup}, active={self.active}, "
            f"repeat={self.repeat}, skip_first={self.skip_first}"
        )

    def _schedule_for(self, first_step: int) -> tuple[Any, int, int | None]:
        """(the torch schedule, the first recorded step, the last one or None if unbounded),
        steps as ``run.state.step`` numbers, for a fit whose first step is ``first_step``."""
        from torch.profiler import schedule

        if self.start_step is not None:
            assert self.steps is not None
            ahead = self.start_step - first_step
            last = self.start_step + self.steps - 1
            if ahead < 0:  # the window began before this fit: record what is left of it
                left = last - first_step + 1
                plan = schedule(wait=0, warmup=0, active=max(left, 1), repeat=1)
                return plan, first_step, last
            warmup = min(1, ahead)
            plan = schedule(
                skip_first=ahead - warmup, wait=0, warmup=warmup, active=self.steps, repeat=1
            )
            return plan, self.start_step, last
        plan = schedule(
            wait=self.wait,
            warmup=self.warmup,
            active=self.active,
            repeat=self.repeat,
            skip_first=self.skip_first,
        )
        first = first_step + self.skip_first + self.wait + self.warmup
        cycle = self.wait + self.warmup + self.active
        if self.repeat == 0:
            return plan, first, None
        return plan, first, first + (self.repeat - 1) * cycle + self.active - 1

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_init_end(self) -> None:
        import torch

        wants_cuda = self.activities is not None and "cuda" in self.activities
        if wants_cuda and not torch.cuda.is_available():
            raise ConfigError(
                "profiler option activities includes 'cuda', but CUDA is not available "
                "here; use activities=['cpu'] or None (CUDA when the run's device is a GPU)"
            )

    @hookimpl
    def on_fit_begin(self, run: Run) -> None:
        self._stop()  # a profiler left from an earlier fit that ended oddly
        self._traces_this_fit = 0
        if not (self.all_ranks or run.is_main_process):
            return
        import torch.profiler

        first_step = run.state.step
        plan, first, last = self._schedule_for(first_step)
        self._window_words = f"profiler window ({self._describe_window()})"
        end = run.total_steps  # the step count at which this fit stops, when known
        if last is not None and last < first_step:
            self._warn(
                f"the {self._window_words} ended at step {last}, before this fit's first step "
                f"{first_step} (a resumed run, or a later fit): nothing will be profiled"
            )
            return
        if end is not None and first >= end:
            self._warn(
                f"the {self._window_words} starts at step {first}, but this fit ends at step "
                f"{end} (max_steps/max_epochs): nothing will be profiled. Lower start_step "
                "(or wait/warmup/skip_first) or raise max_steps"
            )
            return
        directory = Path(self.out_dir) if self.out_dir is not None else run.output_dir / "profiler"
        profiler = torch.profiler.profile(
            activities=self._activities(run),
            schedule=plan,
            on_trace_ready=self._trace_ready(directory, f"rank{run.strategy.rank}"),
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
        )
        profiler.start()
        self._profiler = profiler
        self._open_label(first_step)

    @hookimpl
    def on_step_end(self, run: Run) -> None:
        profiler = self._profiler
        if profiler is None:
            return
        self._close_label()
        profiler.step()
        if run.total_steps is None or run.state.step < run.total_steps:  # a step follows
            self._open_label(run.state.step)

    @hookimpl
    def on_fit_end(self) -> None:
        was_profiling = self._profiler is not None
        self._stop()
        if was_profiling and self._traces_this_fit == 0:
            self._warn(
                f"the {self._window_words} was not reached before the fit ended: "
                "no trace was written"
            )

    @hookimpl
    def on_exception(self) -> None:
        try:
            self._stop()  # writes what the window recorded: the steps before the failure
        except Exception as exc:  # the run's own error matters more
            _say(f"could not write the trace after the failure: {exc!r}")

    # ------------------------------------------------------------------ helpers

    def _activities(self, run: Run) -> list[Any]:
        from torch.profiler import ProfilerActivity

        names = self.activities
        if names is None:
            names = ["cpu", "cuda"] if run.device.type == "cuda" else ["cpu"]
        return [ProfilerActivity.CUDA if n == "cuda" else ProfilerActivity.CPU for n in names]

    def _trace_ready(self, directory: Path, worker: str) -> Any:
        from torch.profiler import tensorboard_trace_handler

        write = tensorboard_trace_handler(str(directory), worker_name=worker)

        def ready(prof: torch.profiler.profile) -> None:
            before = set(directory.glob("*.pt.trace.json")) if directory.is_dir() else set()
            write(prof)
            # the handler names the file itself (worker.time_ns): find the one it wrote
            written = sorted(set(directory.glob("*.pt.trace.json")) - before)
            self.traces.extend(written)
            self._traces_this_fit += 1
            for path in written:
                _say(f"trace written to {path} (open it in https://ui.perfetto.dev)")
            if self.table_rows:
                _say("top operators by self time:\n" + self._table(prof))

        return ready

    def _table(self, prof: torch.profiler.profile) -> str:
        from torch.profiler import ProfilerActivity

        sort_by = self.sort_by
        if sort_by is None:
            cuda = ProfilerActivity.CUDA in prof.activities
            sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table: str = prof.key_averages().table(sort_by=sort_by, row_limit=self.table_rows)
        return table

    def _open_label(self, step: int) -> None:
        import torch.profiler

        label = torch.profiler.record_function(f"treadle/step {step}")
        label.__enter__()  # type: ignore[no-untyped-call]  # closed in _close_label
        self._label = label

    def _close_label(self) -> None:
        label, self._label = self._label, None
        if label is not None:
            label.__exit__(None, None, None)

    def _stop(self) -> None:
        profiler, self._profiler = self._profiler, None
        self._close_label()
        if profiler is not None:
            profiler.stop()

    def _warn(self, text: str) -> None:
        warnings.warn(f"profiler: {text}", TreadleWarning, stacklevel=3)
