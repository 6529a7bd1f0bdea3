"""``lr-finder``: Lightning's learning-rate range test, as a short pre-run before training.

At the start of the run's first ``fit()`` (``on_fit_begin``, only while ``run.state.step == 0``)
the plugin trains ``num_training`` optimizer steps with the learning rate of every parameter
group rising from ``min_lr`` to ``max_lr`` (exponentially by default: step ``i`` uses
``min_lr * (max_lr / min_lr) ** (i / (num_training - 1))``), records each step's loss
smoothed as Lightning does (``avg = beta * avg + (1 - beta) * loss``, divided by
``1 - beta ** (i + 1)``), and stops early once the smoothed loss exceeds
``early_stop_threshold`` times the best one so far (or is not finite). The suggestion is the
learning rate where the smoothed loss falls fastest: the most negative ``torch.gradient`` of
the loss against ``log(lr)`` in the exponential mode (as fastai and Lightning 1.x did; current
Lightning differentiates against ``lr`` itself, which on the log-spaced grid amplifies the
noise of the first, tiny steps and picks them), against ``lr`` in the linear mode, leaving out
the first ``skip_begin`` and last ``skip_end`` points. Then it puts everything back: weights,
optimizer state and learning rates, scheduler, precision (loss scaler) and every random stream are bit for bit what they
were, and the training loop's own data loader was never touched, so with ``apply=False`` the
fit that follows is exactly the fit without the plugin.

Each test step goes the way a training step goes: ``grad_accum_steps`` micro-batches through
the ``training_step`` provider (so the ``compute_loss`` provider, the precision's autocast and
loss scaling and the strategy's backward are those of the run; ``no_sync`` on non-final
micro-batches), then the strategy's ``finalize_gradients`` and ``optimizer_step``. The step
events (``on_step_begin`` ... ``on_step_end``) do not fire for these steps, as Lightning swaps
the callbacks out during its test, so no plugin counts them (gradient clipping by the
``grad-clip`` plugin is not applied either); ``run.backward`` still fires the backward events.
The loss of each step is read on the host (a synchronisation per step: the test needs it),
averaged over ranks, so every rank stops and suggests alike.

Data: a loader built by the run's ``make_train_loader`` provider from ``data`` (when given)
or the run's ``train_data``, from its start, re-iterated if it has fewer batches than needed.
(The run does not expose the loader ``fit`` built, so the finder builds its own: the same
batches, batch size, collation and sharding; a DataLoader the provider passes through as is
is iterated afresh, which changes nothing for a stateless sampler.)

Results, on the main process: ``run.log({"lr_finder/suggested_lr": lr})`` (at step 0), one
line on stderr, ``OUTPUT/lr_finder.csv`` and ``OUTPUT/lr_finder.json`` (every step's lr, loss
and smoothed loss, the options and the suggestion; always), and ``OUTPUT/lr_finder.png``
(smoothed loss against lr on a log axis, the suggestion marked) when matplotlib is installed
(``pip install "treadle[plot]"``; otherwise a warning says so). ``suggested_lr`` and
``results`` hold them on the plugin.

``apply=True`` sets the suggestion as the learning rate of the training that follows: every
param group's ``lr`` becomes it (scaled by the factor a scheduler applies at its current step,
e.g. 0 at the start of a warm-up), and a ``torch.optim.lr_scheduler`` scheduler's
``base_lrs`` and the groups' ``initial_lr`` become it, so the schedule (warm-up, decay) is
followed from the new peak. A reduce-on-plateau scheduler works on the groups' ``lr``
directly, so it follows too; any other scheduler object gets a warning that it may override
the new value. Schedules whose shape depends on the original lr (``polynomial``'s ``lr_end``
ratio) keep their original shape factors.

Decisions:

* Resume does not rerun it: the test runs only when ``run.state.step == 0``; the checkpoint
  keeps the plugin's result (under ``"lr-finder"``) and the applied lr is in the optimizer
  and scheduler state. A fit that starts past step 0 without a result (the plugin added to a
  resumed run, a second ``fit``) gets a ``TreadleWarning``: nothing is tested.
* It runs after the other plugins' ``on_fit_begin`` (``trylast``), so loggers are started
  when it logs the suggestion.
* The strategy must be able to give its model and optimizer state as tensors in memory
  (single device, DDP, FSDP do); DeepSpeed's engine keeps its own and is refused with a
  ``TreadleError``.
* Too few finite losses for a suggestion (a very early stop) is a ``TreadleWarning``; nothing
  is applied.

Options: ``min_lr`` (float, 1e-8), ``max_lr`` (float, 1.0), ``num_training`` (int, 100),
``mode`` (``"exponential"`` | ``"linear"``, ``"exponential"``), ``early_stop_threshold``
(float | None, 4.0; None: never stop early), ``beta`` (float in [0, 1), 0.98), ``skip_begin``
(int, 10), ``skip_end`` (int, 1), ``apply`` (bool, False), ``data`` (training data for the
test | None, None: the run's), ``plot`` (bool, True).

Equivalents: Lightning's ``Tuner(trainer).lr_find(model, min_lr, max_lr, num_training, mode,
early_stop_threshold, update_attr)`` and its ``LearningRateFinder`` callback; the HF Trainer has
none.

Example::

    finder = LRFinder(min_lr=1e-6, max_lr=1.0, num_training=50, apply=True)
    treadle.Run(model, data, config=treadle.Config(max_steps=200), plugins=[finder]).fit()
    print(finder.suggested_lr)   # also OUTPUT/lr_finder.{csv,json,png}
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from treadle.errors import ConfigError, TreadleError, TreadleWarning
from treadle.hookspecs import hookimpl
from treadle.state import LossSum

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["LRFinder", "suggest_lr"]

_MODES = ("exponential", "linear")


def _invalid(option: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"lr-finder option {option} = {value!r} is not allowed: {allowed}")


def _positive_float(option: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _invalid(option, value, "expected a finite number > 0")
    return float(value)


def _count(option: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _invalid(option, value, f"expected an integer >= {minimum}")
    return value


def _say(text: str) -> None:
    """One line for the user; a closed stream (a dead pipe) must never stop a run."""
    with contextlib.suppress(OSError, ValueError):
        print(f"treadle lr-finder: {text}", file=sys.stderr, flush=True)


def suggest_lr(
    lrs: list[float],
    losses: list[float],
    skip_begin: int = 10,
    skip_end: int = 1,
    *,
    log_scale: bool = True,
) -> float | None:
    """The lr of the steepest fall of ``losses``, against ``log(lr)`` (``log_scale``, for the
    exponential mode) or against ``lr``.

    The first ``skip_begin`` and last ``skip_end`` points and non-finite losses are left out;
    None when fewer than two points remain.
    """
    end = len(losses) - skip_end
    kept = [(lr, loss) for lr, loss in zip(lrs[skip_begin:end], losses[skip_begin:end])]
    kept = [(lr, loss) for lr, loss in kept if math.isfinite(loss)]
    if len(kept) < 2:
        return None
    xs = torch.tensor([lr for lr, _ in kept], dtype=torch.float64)
    if log_scale:
        xs = xs.log()
    ys = torch.tensor([loss for _, loss in kept], dtype=torch.float64)
    gradients = torch.gradient(ys, spacing=[xs])[0]
    return kept[int(torch.argmin(gradients))][0]


def _set_lr(group: MutableMapping[str, Any], lr: float) -> None:
    if isinstance(group["lr"], torch.Tensor):  # a capturable / fused optimizer's tensor lr
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def _cycled(loader: Iterable[Any]) -> Iterator[Any]:
    """The loader's batches, again from its start whenever it runs out."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise TreadleError("lr-finder: the training data yielded no batch")


class _Snapshot:
    """Everything a test step changes, copied in memory, to be put back bit for bit."""

    def __init__(self, run: Run) -> None:
        strategy, model, optimizer = run.strategy, run.wrapped_model, run.optimizer
        assert optimizer is not None
        weights = strategy.model_state_dict(model, sharded=True)
        if not isinstance(weights, Mapping) or not all(
            isinstance(value, torch.Tensor) for value in weights.values()
        ):
            raise TreadleError(
                f"lr-finder cannot run under strategy {strategy.name!r}: it keeps the model's "
                "state inside its engine, so the weights cannot be copied and restored in "
                "memory after the test. Run the finder with another strategy (e.g. 'single' "
                "or 'ddp') and pass its suggestion as the optimizer's lr."
            )
        self.weights = {name: value.detach().clone() for name, value in weights.items()}
        self.optimizer = copy.deepcopy(strategy.optimizer_state_dict(optimizer, sharded=True))
        self.scheduler = (
            copy.deepcopy(run.scheduler.state_dict()) if run.scheduler is not None else None
        )
        self.precision = copy.deepcopy(run.precision.state_dict())

    def restore(self, run: Run) -> None:
        strategy, optimizer = run.strategy, run.optimizer
        assert optimizer is not None
        optimizer.zero_grad(set_to_none=True)
        strategy.load_model_state_dict(run.wrapped_model, self.weights, sharded=True)
        strategy.load_optimizer_state_dict(optimizer, self.optimizer, sharded=True)
        if run.scheduler is not None and self.scheduler is not None:
            run.scheduler.load_state_dict(self.scheduler)
        run.precision.load_state_dict(self.precision)


class LRFinder:
    """Learning-rate range test before the first step; see the module docstring.

    Args:
        min_lr, max_lr: the range of learning rates tested (0 < min_lr < max_lr).
        num_training: the number of test steps (one learning rate each, >= 2).
        mode: ``"exponential"`` or ``"linear"`` growth of the learning rate.
        early_stop_threshold: stop when the smoothed loss exceeds this times the best one
            (> 1); None: run every step.
        beta: smoothing of the loss (0: none).
        skip_begin, skip_end: points left out of the suggestion at either end.
        apply: set the suggested lr (and the scheduler's base lrs) for the training.
        data: training data for the test (anything ``train_data`` accepts); None: the run's.
        plot: write ``lr_finder.png`` when matplotlib is installed.
    """

    name: ClassVar[str] = "lr-finder"

    def __init__(
        self,
        min_lr: float = 1e-8,
        max_lr: float = 1.0,
        num_training: int = 100,
        mode: str = "exponential",
        early_stop_threshold: float | None = 4.0,
        beta: float = 0.98,
        skip_begin: int = 10,
        skip_end: int = 1,
        apply: bool = False,
        data: Any = None,
        plot: bool = True,
    ) -> None:
        self.min_lr = _positive_float("min_lr", min_lr)
        self.max_lr = _positive_float("max_lr", max_lr)
        if self.max_lr <= self.min_lr:
            raise _invalid("max_lr", max_lr, f"expected a value above min_lr = {min_lr!r}")
        self.num_training = _count("num_training", num_training, 2)
        if mode not in _MODES:
            raise _invalid("mode", mode, f"expected one of {_MODES}")
        self.mode = mode
        if early_stop_threshold is not None:
            early_stop_threshold = _positive_float("early_stop_threshold", early_stop_threshold)
            if early_stop_threshold <= 1:
                raise _invalid(
                    "early_stop_threshold", early_stop_threshold, "expected a number > 1 or None"
                )
        self.early_stop_threshold = early_stop_threshold
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 1:
            raise _invalid("beta", beta, "expected a number in [0, 1)")
        self.beta = float(beta)
        self.skip_begin = _count("skip_begin", skip_begin, 0)
        self.skip_end = _count("skip_end", skip_end, 0)
        if self.skip_begin + self.skip_end + 2 > self.num_training:
            raise ConfigError(
                f"lr-finder: num_training = {num_training} leaves fewer than 2 points for a "
                f"suggestion after skip_begin = {skip_begin} and skip_end = {skip_end}; raise "
                "num_training or lower the skips"
            )
        for option, value in (("apply", apply), ("plot", plot)):
            if not isinstance(value, bool):
                raise _invalid(option, value, "expected True or False")
        self.apply = apply
        self.plot = plot
        if data is not None and isinstance(data, str | bytes | Mapping):
            raise _invalid("data", type(data).__name__, "expected a DataLoader, Dataset or a "
                           "list of batches (or None for the run's train_data)")  # fmt: skip
        self.data = data
        #: the suggested learning rate, once the test ran (None: no suggestion possible).
        self.suggested_lr: float | None = None
        #: per test step: "lr", "loss" (raw), "smoothed_loss".
        self.results: dict[str, list[float]] = {"lr": [], "loss": [], "smoothed_loss": []}
        #: whether the test ran (in this process or in the run a checkpoint came from).
        self.done = False
        self.applied = False

    def __repr__(self) -> str:
        return (
            f"LRFinder(min_lr={self.min_lr}, max_lr={self.max_lr}, "
            f"num_training={self.num_training}, mode={self.mode!r}, apply={self.apply})"
        )

    def lr_at(self, index: int) -> float:
        """The learning rate of test step ``index`` (0 ... num_training - 1)."""
        fraction = index / (self.num_training - 1)
        if self.mode == "linear":
            return self.min_lr + fraction * (self.max_lr - self.min_lr)
        return float(self.min_lr * (self.max_lr / self.min_lr) ** fraction)

    # ------------------------------------------------------------------ hooks

    @hookimpl(trylast=True)
    def on_fit_begin(self, run: Run) -> None:
        if self.done:
            return  # once per run; after resume the checkpoint brought the result back
        if run.state.step != 0:
            warnings.warn(
                f"lr-finder runs only before a run's first step; this fit starts at step "
                f"{run.state.step} (a resumed run whose checkpoint has no lr-finder result, or "
                "a later fit), so no learning rate is tested or applied.",
                TreadleWarning,
                stacklevel=2,
            )
            return
        self.done = True
        snapshot = _Snapshot(run)
        try:
            from treadle.checkpoint import rng_preserved

            with rng_preserved(run.device):
                self._range_test(run)
        finally:
            snapshot.restore(run)
        self.suggested_lr = suggest_lr(
            self.results["lr"],
            self.results["smoothed_loss"],
            self.skip_begin,
            self.skip_end,
            log_scale=self.mode == "exponential",
        )
        self._report(run)
        if self.apply and self.suggested_lr is not None:
            self._apply(run, self.suggested_lr)

    @hookimpl
    def on_save_checkpoint(self, plugin_state: MutableMapping[str, Any]) -> None:
        if self.done:
            plugin_state[self.name] = {
                "done": True,
                "suggested_lr": self.suggested_lr,
                "applied": self.applied,
            }

    @hookimpl
    def on_load_checkpoint(self, plugin_state: Mapping[str, Any]) -> None:
        state = plugin_state.get(self.name)
        if isinstance(state, Mapping) and state.get("done"):
            self.done = True
            lr = state.get("suggested_lr")
            self.suggested_lr = None if lr is None else float(lr)
            self.applied = bool(state.get("applied"))

    # ------------------------------------------------------------------ the test

    def _range_test(self, run: Run) -> None:
        strategy, model, optimizer = run.strategy, run.wrapped_model, run.optimizer
        assert optimizer is not None
        loader = run.provide(
            "make_train_loader",
            run=run,
            data=self.data if self.data is not None else run.train_data,
        )
        batches = _cycled(loader)
        accumulation = run.config.grad_accum_steps
        normalization = run.config.loss_normalization
        results = self.results = {"lr": [], "loss": [], "smoothed_loss": []}
        average = best = 0.0
        for index in range(self.num_training):
            lr = self.lr_at(index)
            for group in optimizer.param_groups:
                _set_lr(group, lr)
            total: torch.Tensor | None = None
            count: torch.Tensor | int = 0
            for micro in range(accumulation):
                batch = strategy.to_device(next(batches))
                final = micro == accumulation - 1
                with contextlib.nullcontext() if final else strategy.no_sync(model):
                    loss = run.provide("training_step", run=run, model=model, batch=batch)
                part, items = _loss_parts(loss, normalization)
                total = part if total is None else total + part
                count = count + items
            assert total is not None
            strategy.finalize_gradients(optimizer, count)
            strategy.optimizer_step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            mean = (total / count).detach().float().reshape(())
            value = float(strategy.all_reduce(mean.clone(), "mean").item())
            average = self.beta * average + (1 - self.beta) * value
            smoothed = average / (1 - self.beta ** (index + 1))
            results["lr"].append(lr)
            results["loss"].append(value)
            results["smoothed_loss"].append(smoothed)
            if not math.isfinite(smoothed):
                break
            if (
                self.early_stop_threshold is not None
                and index > 0
                and smoothed > self.early_stop_threshold * best
            ):
                break
            if index == 0 or smoothed < best:
                best = smoothed

    # ------------------------------------------------------------------ results

    def _report(self, run: Run) -> None:
        steps = len(self.results["lr"])
        stopped = f", stopped early at lr {self.results['lr'][-1]:.3g} (loss diverged)"
        early = stopped if steps < self.num_training else ""
        if self.suggested_lr is None:
            warnings.warn(
                f"lr-finder: no suggestion: only {steps} test steps ran{early}, leaving fewer "
                f"than 2 finite losses after skip_begin = {self.skip_begin} and skip_end = "
                f"{self.skip_end}. Lower min_lr, raise num_training or lower skip_begin."
                + (" Nothing was applied (apply=True)." if self.apply else ""),
                TreadleWarning,
                stacklevel=3,
            )
        else:
            run.log({"lr_finder/suggested_lr": self.suggested_lr})
        if not run.is_main_process:
            return
        paths = self._write(run.output_dir)
        if self.suggested_lr is not None:
            action = "applied" if self.apply else "not applied (apply=False)"
            _say(
                f"suggested lr {self.suggested_lr:.3g} ({action}) from {steps} steps between "
                f"{self.min_lr:.3g} and {self.max_lr:.3g}{early}; "
                f"see {', '.join(str(p) for p in paths)}"
            )

    def _write(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        rows = zip(self.results["lr"], self.results["loss"], self.results["smoothed_loss"])
        csv_path = directory / "lr_finder.csv"
        with csv_path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "lr", "loss", "smoothed_loss"])
            for index, (lr, loss, smoothed) in enumerate(rows):
                writer.writerow([index, repr(lr), repr(loss), repr(smoothed)])
        json_path = directory / "lr_finder.json"
        document = {
            "suggested_lr": self.suggested_lr,
            "options": {
                "min_lr": self.min_lr,
                "max_lr": self.max_lr,
                "num_training": self.num_training,
                "mode": self.mode,
                "early_stop_threshold": self.early_stop_threshold,
                "beta": self.beta,
                "skip_begin": self.skip_begin,
                "skip_end": self.skip_end,
                "apply": self.apply,
            },
            **{key: [_jsonable(v) for v in values] for key, values in self.results.items()},
        }
        json_path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        paths = [csv_path, json_path]
        if self.plot:
            png = self._plot(directory / "lr_finder.png")
            if png is not None:
                paths.append(png)
        return paths

    def _plot(self, target: Path) -> Path | None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            warnings.warn(
                "lr-finder: matplotlib is not installed, so lr_finder.png was not drawn (the "
                'CSV and JSON were written). pip install "treadle[plot]", or pass plot=False.',
                TreadleWarning,
                stacklevel=5,
            )
            return None
        figure = Figure(figsize=(6, 4), layout="constrained")
        FigureCanvasAgg(figure)
        ax = figure.subplots()
        ax.plot(self.results["lr"], self.results["smoothed_loss"], label="smoothed loss")
        ax.plot(self.results["lr"], self.results["loss"], alpha=0.3, label="loss")
        if self.suggested_lr is not None:
            index = self.results["lr"].index(self.suggested_lr)
            point = self.results["smoothed_loss"][index]
            ax.plot([self.suggested_lr], [point], "o", color="red", label="suggested lr")
        if self.mode == "exponential":
            ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        figure.savefig(target, dpi=100)
        return target

    def _apply(self, run: Run, lr: float) -> None:
        optimizer, scheduler = run.optimizer, run.scheduler
        assert optimizer is not None
        groups = optimizer.param_groups
        base_lrs = getattr(scheduler, "base_lrs", None)
        if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) and isinstance(
            base_lrs, list
        ):
            for index, group in enumerate(groups):
                # the factor the schedule applies at its current step (0 at a warm-up's start)
                base = float(base_lrs[index])
                factor = float(group["lr"]) / base if base else 1.0
                base_lrs[index] = lr
                if "initial_lr" in group:
                    group["initial_lr"] = lr
                _set_lr(group, lr * factor)
        else:
            for group in groups:
                _set_lr(group, lr)
            follows = scheduler is None or isinstance(
                getattr(scheduler, "plateau", scheduler), torch.optim.lr_scheduler.ReduceLROnPlateau
            )
            if not follows:
                warnings.warn(
                    f"lr-finder: the scheduler {type(scheduler).__name__} is not a "
                    "torch.optim.lr_scheduler scheduler, so only the optimizer's lr was set to "
                    f"{lr:.3g}; the scheduler may override it at its next step.",
                    TreadleWarning,
                    stacklevel=3,
                )
        self.applied = True


def _loss_parts(loss: torch.Tensor | LossSum, normalization: str) -> tuple[torch.Tensor, Any]:
    """(numerator, denominator) of a micro-batch's share of the step's loss, as the loop adds
    them up: the items scored under ``loss_normalization="tokens"``, else one per batch."""
    if isinstance(loss, LossSum):
        if normalization == "tokens":
            return loss.total.detach(), loss.count
        return (loss.total / loss.count).detach(), 1
    return loss.detach(), 1


def _jsonable(value: float) -> float | None:
    return value if math.isfinite(value) else None
