"""``debug-overflow``: find the module that first produces inf or NaN (HF's
``DebugUnderflowOverflow``).

While ``fit`` runs, a forward hook on every module of ``run.model`` records a *frame* per
module call: the module's qualified name and class, then the absolute min and max of each of
its own weights, its inputs (positional and keyword) and its outputs (nested tuples, lists and
mappings included). The last ``max_frames_to_save`` frames are kept. At the first module call
where any of them holds inf or NaN, the plugin raises ``OverflowDetected``, whose message names
that module and says whether its output, its input or a weight went bad, followed by the saved
frames leading up to it (the last one is the culprit's). Very small absolute minimums in the
frames show underflow towards 0 (in fp16, below ~6e-8).

A bad *input* means it was produced outside any module call the hooks see: by the forward code
of the enclosing module (named in the message, from the stack of running modules) or by the
batch itself. A bad *weight* means the optimizer step before made it so.

Options:

* ``max_frames_to_save`` (``int``, default 21): frames kept and reported.
* ``trace_batch_nums`` (``list[int]``, default ``[]``): print every frame of these batches
  (forward passes of the model, counted from 0 at the start of each fit; evaluation passes
  during the fit count too) to standard output, for a look at a healthy run.
* ``abort_after_batch_num`` (``int | None``, default ``None``): stop the fit (a non-final
  ``run.request_stop``, acted on at the next step boundary) once this batch number is done;
  HF raises instead.

The hooks are removed when the fit ends, normally or by an exception, so evaluation and
prediction after ``fit`` run without them. Each module call reads its statistics back from the
device (one synchronisation per module per forward): a debugging tool, slow on a GPU.

HF Trainer: ``TrainingArguments(debug="underflow_overflow")``. Lightning: none built in
(``detect_anomaly`` finds NaN in backward).

Example::

    run = treadle.Run(model, train_data=data, precision="fp16-mixed",
                      plugins=[{"name": "debug-overflow", "max_frames_to_save": 10}])
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from treadle.errors import ConfigError, TreadleError
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from treadle.run import Run

__all__ = ["DebugOverflow", "OverflowDetected"]

_PREFIX = " " * 17  # HF's indentation of frame headers


class OverflowDetected(TreadleError):
    """A module's weights, inputs or outputs hold inf or NaN; the message holds the frames."""

    def __init__(self, message: str, module_name: str, module_class: str, frames: list[str]):
        super().__init__(message)
        self.module_name = module_name
        self.module_class = module_class
        self.frames = frames


def _invalid(option: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"debug-overflow option {option} = {value!r} is not allowed: {allowed}")


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


class DebugOverflow:
    """Raise at the first module call with inf/NaN in its weights, inputs or outputs.

    Args:
        max_frames_to_save: module calls kept and reported before the bad one (>= 1).
        trace_batch_nums: batch numbers whose frames are all printed.
        abort_after_batch_num: stop the fit after this batch number.
    """

    name: ClassVar[str] = "debug-overflow"

    def __init__(
        self,
        max_frames_to_save: int = 21,
        trace_batch_nums: Sequence[int] = (),
        abort_after_batch_num: int | None = None,
    ) -> None:
        if not _is_count(max_frames_to_save, 1):
            raise _invalid("max_frames_to_save", max_frames_to_save, "expected an integer >= 1")
        given: Any = trace_batch_nums  # from a TOML file: anything
        if isinstance(given, str) or not all(_is_count(n, 0) for n in given):
            raise _invalid("trace_batch_nums", trace_batch_nums, "expected a list of integers >= 0")
        if abort_after_batch_num is not None and not _is_count(abort_after_batch_num, 0):
            raise _invalid(
                "abort_after_batch_num", abort_after_batch_num, "expected an integer >= 0 or None"
            )
        self.max_frames_to_save = max_frames_to_save
        self.trace_batch_nums = frozenset(trace_batch_nums)
        self.abort_after_batch_num = abort_after_batch_num
        self.frames: collections.deque[str] = collections.deque(maxlen=max_frames_to_save)
        #: forward passes of the model begun in this fit, minus one (HF's batch_number)
        self.batch_number = -1
        self._handles: list[RemovableHandle] = []
        self._names: dict[nn.Module, str] = {}
        self._running: list[nn.Module] = []  # modules whose forward is under way, outermost first
        self._root: nn.Module | None = None
        self._run: Run | None = None

    def __repr__(self) -> str:
        return (
            f"DebugOverflow(max_frames_to_save={self.max_frames_to_save}, "
            f"trace_batch_nums={sorted(self.trace_batch_nums)}, "
            f"abort_after_batch_num={self.abort_after_batch_num})"
        )

    # ------------------------------------------------------------------ hooks of the run

    @hookimpl
    def on_fit_begin(self, run: Run) -> None:
        self.remove_hooks()
        self._run, self._root = run, run.model
        self.frames.clear()
        self.batch_number = -1
        self._running = []
        self._names = {module: name or "(model)" for name, module in run.model.named_modules()}
        for module in self._names:
            self._handles.append(module.register_forward_pre_hook(self._before))
            self._handles.append(module.register_forward_hook(self._after, with_kwargs=True))

    @hookimpl
    def on_fit_end(self) -> None:
        self.remove_hooks()

    @hookimpl
    def on_exception(self) -> None:
        self.remove_hooks()

    def remove_hooks(self) -> None:
        """Remove every module hook this plugin added (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._running = []

    # ------------------------------------------------------------------ module hooks

    def _before(self, module: nn.Module, args: Any) -> None:
        if module is self._root:
            self.batch_number += 1
            self.frames.append(
                f"\n{_PREFIX} *** Starting batch number={self.batch_number} ***\n"
                f"{'abs min':8} {'abs max':8} metadata"
            )
        self._running.append(module)

    def _after(self, module: nn.Module, args: Any, kwargs: Mapping[str, Any], output: Any) -> None:
        if self._running and self._running[-1] is module:
            self._running.pop()
        name = self._names.get(module, "?")
        lines = [f"{_PREFIX} {name} {type(module).__name__}"]
        bad: list[str] = []
        for kind, label, value in _variables(module, args, kwargs, output):
            line, finite = _describe(value, label)
            lines.append(line)
            if not finite:
                bad.append(kind)
        frame = "\n".join(lines)
        self.frames.append(frame)
        tracing = self.batch_number in self.trace_batch_nums
        if tracing:
            print(frame)
        if bad:
            self._raise(module, name, bad)
        if module is self._root:
            self._end_of_batch()

    def _end_of_batch(self) -> None:
        limit = self.abort_after_batch_num
        if limit is not None and self.batch_number >= limit and self._run is not None:
            self._run.request_stop(
                f"debug-overflow: abort_after_batch_num={limit} reached", final=False
            )

    def _raise(self, module: nn.Module, name: str, bad: list[str]) -> None:
        cls = type(module).__name__
        step = self._run.state.step if self._run is not None else "?"
        where = f"during batch number {self.batch_number} (step {step})"
        if "weight" in bad:
            cause = (
                f"a weight of module {name!r} ({cls}) holds inf/NaN {where}: the optimizer step "
                "before made it so"
            )
        elif "output" in bad and "input" not in bad:
            cause = f"module {name!r} ({cls}) produced inf/NaN {where} from finite inputs"
        else:
            outer = next((m for m in reversed(self._running) if m is not module), None)
            source = (
                f"the forward code of {self._names.get(outer, '?')!r} "
                f"({type(outer).__name__}) outside its submodules"
                if outer is not None
                else "the batch"
            )
            cause = (
                f"an input of module {name!r} ({cls}) holds inf/NaN {where}; it came from {source}"
            )
        frames = list(self.frames)
        self.remove_hooks()  # the error unwinds through the model: report once
        raise OverflowDetected(
            f"debug-overflow: {cause}. The last {len(frames)} forward frames "
            f"(abs min, abs max, what), the last one the culprit's:\n" + "\n".join(frames),
            name,
            cls,
            frames,
        )


def _variables(
    module: nn.Module, args: Any, kwargs: Mapping[str, Any], output: Any
) -> list[tuple[str, str, Any]]:
    """(kind, label, value) for a module call: its own weights, its inputs, its outputs."""
    found: list[tuple[str, str, Any]] = [
        ("weight", name, p) for name, p in module.named_parameters(recurse=False)
    ]
    inputs = [(f"input[{i}]", a) for i, a in enumerate(args)]
    inputs += [(f"input[{key!r}]", value) for key, value in kwargs.items()]
    for label, value in inputs:
        found += [("input", lab, v) for lab, v in _flatten(value, label)]
    found += [("output", lab, v) for lab, v in _flatten(output, "output")]
    return found


def _flatten(value: Any, label: str, depth: int = 0) -> list[tuple[str, Any]]:
    if isinstance(value, torch.Tensor) or depth >= 3:
        return [(label, value)]
    if isinstance(value, Mapping):
        return [
            item for key, v in value.items() for item in _flatten(v, f"{label}[{key!r}]", depth + 1)
        ]
    if isinstance(value, tuple | list):
        return [
            item for i, v in enumerate(value) for item in _flatten(v, f"{label}[{i}]", depth + 1)
        ]
    return [(label, value)]


def _describe(value: Any, label: str) -> tuple[str, bool]:
    """A frame line for ``value`` and whether it is finite (non-tensors count as finite)."""
    if value is None:
        return f"{'None':>17} {label}", True
    if not isinstance(value, torch.Tensor):
        return f"{'not a tensor':>17} {label}", True
    if value.numel() == 0 or value.dtype == torch.bool:
        return f"{'empty' if value.numel() == 0 else 'bool':>17} {label}", True
    with torch.no_grad():
        magnitude = value.detach().abs()
        # min/max propagate NaN, and an inf is the max: the max tells finiteness
        low, high = torch.stack([magnitude.min(), magnitude.max()]).double().tolist()
    finite = high == high and high != float("inf")
    return f"{low:8.2e} {high:8.2e} {label}", finite
