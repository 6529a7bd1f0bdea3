"""Hugging Face ``TrainerCallback``s run unchanged as treadle plugins.

treadle asks every installed adapter (entry-point group ``treadle.adapter``) about a
``plugins=`` object that implements no treadle hook. ``adapt`` accepts two kinds of object:

* a ``transformers.TrainerCallback`` instance: wrapped in an ``HFCallback`` plugin;
* a ``transformers.TrainingArguments`` instance: the ``args`` every callback of that run sees
  (``plugins=[training_args, EarlyStoppingCallback(2)]``). Without one, the callbacks see
  arguments built from the run's ``Config`` (``arguments_for``).

Each callback gets its own wrapper, but the wrappers of one run share one ``TrainerState`` and
one ``TrainerControl`` (a ``_Session``), and the first wrapper calls every callback in
``plugins=`` order, as HF's ``CallbackHandler`` does, so callbacks see each other's flags.

Where each HF event fires (treadle hook → HF event)::

    on_init_end               → on_init_end
    on_fit_begin              → on_train_begin
    on_epoch_begin            → on_epoch_begin
    on_step_begin             → on_step_begin
    on_micro_step_end         → on_substep_end (a micro-batch that is not the window's last)
    on_before_optimizer_step  → on_pre_optimizer_step
    on_after_optimizer_step   → on_optimizer_step
    on_step_end               → on_step_end
    on_log                    → on_log; after an evaluation's log also on_evaluate
    on_eval_step_end          → on_prediction_step   (on_predict_step_end too)
    on_save_end               → on_save
    on_epoch_end              → on_epoch_end
    on_fit_end                → on_log (the training summary), on_train_end
    on_predict_end            → on_predict

The run's ``Config`` cadence (``log_every``, ``eval_every``, ``save_every``, the end of ``fit``)
plays HF's ``DefaultFlowCallback``: the flags are set as it would set them before the
callbacks see ``on_step_end``. A flag a callback sets becomes a request to the run
(``request_log``/``request_eval``/``request_save``/``request_stop``), acted on at the step
boundary right after; the README ("TrainerCallbacks") lists what cannot be honoured exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import treadle
from treadle import PluginError, TreadleError, TreadleWarning

if TYPE_CHECKING:
    import torch
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = ["HFCallback", "HFTrainingArguments", "adapt", "arguments_for"]

#: The adapter's entry-point name: wrappers are registered as ``hf-callbacks:<class name>``.
ADAPTER = "hf-callbacks"
#: Key of the callbacks' state in a checkpoint's plugin state.
STATE_KEY = "hf-callbacks"


def adapt(obj: object) -> object | None:
    """A treadle plugin for a ``TrainerCallback`` or ``TrainingArguments``; None otherwise.

    Never imports transformers: an object of a transformers class exists only once
    transformers is imported, so other objects are refused from ``sys.modules`` alone.
    """
    callbacks = sys.modules.get("transformers.trainer_callback")
    if callbacks is not None and isinstance(obj, callbacks.TrainerCallback):
        return HFCallback(obj)
    training_args = sys.modules.get("transformers.training_args")
    if training_args is not None and isinstance(obj, training_args.TrainingArguments):
        return HFTrainingArguments(obj)
    return None


# ---------------------------------------------------------------- the plugins


_order = itertools.count()  # creation order = plugins= order: the order callbacks are called


class HFTrainingArguments:
    """``plugins=[training_args]``: the ``args`` the run's ``TrainerCallback``s receive."""

    def __init__(self, args: TrainingArguments) -> None:
        self.args = args

    @treadle.hookimpl(wrapper=True)
    def on_init_end(self, run: treadle.Run) -> Iterator[None]:
        # before any callback's on_init_end: every wrapper's setup half runs first
        _session(run).user_args = self.args
        return (yield)

    @treadle.hookimpl(tryfirst=True)
    def on_fit_begin(self, run: treadle.Run) -> None:
        # before the callbacks' on_train_begin, also when added by run.add_plugin
        _session(run).user_args = self.args


class HFCallback:
    """One ``TrainerCallback`` as a treadle plugin. The first ``HFCallback`` of a run (the
    leader) calls every callback of the run; the others only make themselves known."""

    def __init__(self, callback: TrainerCallback) -> None:
        self.callback = callback
        self.order = next(_order)
        self.name = f"{ADAPTER}:{type(callback).__name__}"

    def _lead(self, run: treadle.Run) -> _Session | None:
        session = _session(run)
        session.join(self)
        if session.members[0] is not self:
            return None
        session.ready(run)
        return session

    # ------------------------------------------------ the run

    @treadle.hookimpl(wrapper=True)
    def on_init_end(self, run: treadle.Run) -> Iterator[None]:
        _session(run).join(self)  # setup halves first: every member is known to the leader
        result = yield
        if (session := self._lead(run)) is not None:
            session.fire(run, "on_init_end")
        return result

    @treadle.hookimpl(wrapper=True)
    def make_train_loader(self, run: treadle.Run) -> Iterator[Any]:
        loader = yield
        if (session := self._lead(run)) is not None:
            session.train_loader = loader
            session.batches_per_epoch = _length(loader)
        return loader

    @treadle.hookimpl(wrapper=True)
    def make_eval_loader(self, run: treadle.Run) -> Iterator[Any]:
        loader = yield
        if (session := self._lead(run)) is not None:
            session.eval_loader = loader
        return loader

    @treadle.hookimpl
    def on_fit_begin(self, run: treadle.Run) -> None:
        if (session := self._lead(run)) is not None:
            session.begin_fit(run)

    @treadle.hookimpl
    def on_epoch_begin(self, run: treadle.Run) -> None:
        if (session := self._lead(run)) is not None:
            session.fire(run, "on_epoch_begin")
            session.act(run)

    @treadle.hookimpl
    def on_step_begin(self, run: treadle.Run) -> None:
        if (session := self._lead(run)) is not None:
            session.substep_pending = False
            session.fire(run, "on_step_begin")
            session.act(run)

    @treadle.hookimpl
    def on_micro_step_begin(self, run: treadle.Run) -> None:
        # HF's on_substep_end follows a micro-batch that is not the window's last: known only
        # when another one starts (a short last window has fewer), so it fires here.
        if (session := self._lead(run)) is not None and session.substep_pending:
            session.substep_pending = False
            session.fire(run, "on_substep_end")
            session.act(run)

    @treadle.hookimpl
    def on_micro_step_end(self, run: treadle.Run) -> None:
        if (session := self._lead(run)) is not None:
            session.substep_pending = True

    @treadle.hookimpl
    def on_before_optimizer_step(self, run: treadle.Run) -> None:
        if (session := self._lead(run)) is not None:
            session.substep_pending = False  # it was the window's last micro-batch
            session.fire(run, "on_pre_optimizer_step")
            session.act(run)

    @treadle.hookimpl
    def on_after_optimizer_step(self, run: treadle.Run, optimizer: Any) -> None:
        if (session := self._lead(run)) is not None:
            # the rate this step used, before the scheduler moves it: the one HF logs
            session.step_lr = float(optimizer.param_groups[0]["lr"])
            session.fire(run, "on_optimizer_step")
            session.act(run)

    @treadle.hookimpl
    def on_step_end(self, run: treadle.Run, loss: torch.Tensor) -> None:
        if (session := self._lead(run)) is not None:
            session.end_step(run, loss)

    @treadle.hookimpl
    def on_epoch_end(self, run: treadle.Run) -> None:
        if (session := self._lead(run)) is not None:
            session.end_epoch(run)

    @treadle.hookimpl
    def on_fit_end(self, run: treadle.Run) -> None:
        if (session := self._lead(run)) is not None:
            session.end_fit(run)

    @treadle.hookimpl
    def on_exception(self, run: treadle.Run) -> None:
        if (session := self._lead(run)) is not None:
            session.training = False

    @treadle.hookimpl
    def on_log(self, run: treadle.Run, metrics: Mapping[str, float]) -> None:
        if (session := self._lead(run)) is not None:
            session.log(run, metrics)

    # ------------------------------------------------ evaluation and prediction

    @treadle.hookimpl
    def on_eval_begin(self, run: treadle.Run) -> None:
        if (session := self._lead(run)) is not None:
            session.clock = _Clock()

    @treadle.hookimpl
    def on_eval_step_end(self, run: treadle.Run, batch: Any) -> None:
        if (session := self._lead(run)) is not None:
            session.clock.count(batch)
            session.fire(run, "on_prediction_step")

    @treadle.hookimpl
    def on_eval_end(self, run: treadle.Run, name: str, metrics: Mapping[str, float]) -> None:
        # HF logs an evaluation's metrics, then calls on_evaluate: both wait for the run's log
        if (session := self._lead(run)) is not None:
            prefix = "eval" if name == "eval" else f"eval_{name}"
            logs = {_eval_key(prefix, name, key): value for key, value in metrics.items()}
            session.pending_evals.append(logs | session.clock.speed(prefix))

    @treadle.hookimpl
    def on_predict_begin(self, run: treadle.Run) -> None:
        if (session := self._lead(run)) is not None:
            session.clock = _Clock()

    @treadle.hookimpl
    def on_predict_step_end(self, run: treadle.Run, batch: Any, outputs: Any) -> None:
        if (session := self._lead(run)) is not None:
            session.clock.count(batch, loss=getattr(outputs, "loss", None))
            session.fire(run, "on_prediction_step")

    @treadle.hookimpl
    def on_predict_end(self, run: treadle.Run) -> None:
        if (session := self._lead(run)) is not None:
            session.fire(run, "on_predict", metrics=session.clock.speed("test"))

    # ------------------------------------------------ checkpoints

    @treadle.hookimpl
    def on_save_end(self, run: treadle.Run, path: Any) -> None:
        if (session := self._lead(run)) is not None:
            state = session.state
            if state.best_global_step is not None and state.best_global_step == run.state.step:
                state.best_model_checkpoint = str(path)
            session.fire(run, "on_save")
            session.act(run)

    @treadle.hookimpl
    def on_save_checkpoint(self, run: treadle.Run, plugin_state: MutableMapping[str, Any]) -> None:
        if (session := self._lead(run)) is not None:
            plugin_state[STATE_KEY] = session.export()

    @treadle.hookimpl
    def on_load_checkpoint(self, run: treadle.Run, plugin_state: Mapping[str, Any]) -> None:
        if (session := self._lead(run)) is not None and STATE_KEY in plugin_state:
            session.restore(plugin_state[STATE_KEY])


# ---------------------------------------------------------------- one run's shared state


_sessions: weakref.WeakKeyDictionary[treadle.Run, _Session] = weakref.WeakKeyDictionary()


def _session(run: treadle.Run) -> _Session:
    session = _sessions.get(run)
    if session is None:
        session = _sessions[run] = _Session()
    return session


# Flags HF's CallbackHandler clears before calling the callbacks for an event.
_RESETS = {
    "on_train_begin": ("should_training_stop",),
    "on_epoch_begin": ("should_epoch_stop",),
    "on_step_begin": ("should_log", "should_evaluate", "should_save"),
    "on_evaluate": ("should_evaluate",),
    "on_save": ("should_save",),
    "on_log": ("should_log",),
}
_REQUESTS = (
    ("should_log", "request_log"),
    ("should_evaluate", "request_eval"),
    ("should_save", "request_save"),
)
_TRAIN_KEYS = {"lr": "learning_rate"}  # treadle's name → HF's, in the training log


class _Session:
    """The ``TrainerState``, ``TrainerControl`` and callbacks of one run."""

    def __init__(self) -> None:
        self.members: list[HFCallback] = []
        self.user_args: TrainingArguments | None = None
        self.args: TrainingArguments | None = None
        self.args_config: treadle.Config | None = None  # the config self.args was built from
        self.state: TrainerState
        self.control: TrainerControl
        self.train_loader: Any = None
        self.eval_loader: Any = None
        self.batches_per_epoch: int | None = None
        self.training = False
        self.substep_pending = False
        self.pending_evals: list[dict[str, float]] = []
        self.clock = _Clock()
        self.stopped_by: str | None = None  # the callback that set should_training_stop
        self.stop_requested = False
        self.warned: set[str] = set()
        self.fit_clock = _Clock()
        self.fit_first_step = 0
        self.fit_first_samples = 0
        self.loss_sum: torch.Tensor | None = None
        self.step_lr: float | None = None  # the learning rate of the last optimizer step

    def join(self, member: HFCallback) -> None:
        if member not in self.members:
            self.members.append(member)
            self.members.sort(key=lambda m: m.order)

    @property
    def callbacks(self) -> list[TrainerCallback]:
        return [member.callback for member in self.members]

    # ------------------------------------------------ calling the callbacks

    def ready(self, run: treadle.Run) -> None:
        """Build args, state and control once, when the leader first needs them."""
        if self.args is not None:
            return
        from transformers import TrainerControl, TrainerState

        self.args = self.user_args or arguments_for(run)
        self.args_config = run.config
        self.state = TrainerState()
        self.control = TrainerControl()

    def sync(self, run: treadle.Run) -> None:
        """The ``TrainerState`` fields that follow the run's own state."""
        state, own = self.state, run.state
        state.global_step = own.step
        per_epoch = self.batches_per_epoch
        state.epoch = own.epoch + (own.batch_in_epoch / per_epoch if per_epoch else 0.0)
        state.num_input_tokens_seen = own.tokens_seen
        state.is_world_process_zero = run.is_main_process
        state.is_local_process_zero = run.strategy.local_rank == 0

    def fire(self, run: treadle.Run, event: str, **extra: Any) -> None:
        """Call ``event`` on every callback, in order, as HF's ``CallbackHandler`` does."""
        self.sync(run)
        control = self.control
        for flag in _RESETS.get(event, ()):
            setattr(control, flag, False)
        kwargs = {
            "model": run.model,
            "processing_class": None,
            "optimizer": run.optimizer,
            "lr_scheduler": run.scheduler,
            "train_dataloader": self.train_loader,
            "eval_dataloader": self.eval_loader,
            **extra,
        }
        for callback in self.callbacks:
            stopping = control.should_training_stop
            try:
                result = getattr(callback, event)(self.args, self.state, control, **kwargs)
            except TreadleError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"{ADAPTER}:{type(callback).__name__}", event, f"{type(exc).__name__}: {exc}"
                ) from exc
            if result is not None:  # a callback returns control, or None for "no change"
                control = result
            if control.should_training_stop and not stopping and self.stopped_by is None:
                self.stopped_by = type(callback).__name__
        self.control = control

    def act(self, run: treadle.Run) -> None:
        """Turn the flags the callbacks set into requests to the run (during ``fit`` only:
        HF clears them when training starts, so none set outside it carries over)."""
        if not self.training:
            return
        control = self.control
        for flag, request in _REQUESTS:
            if getattr(control, flag):
                getattr(run, request)()  # idempotent: a request already made is one request
        if control.should_training_stop and not self.stop_requested and self.stopped_by:
            self.stop_requested = True
            run.request_stop(f"{self.stopped_by} set TrainerControl.should_training_stop")
        if control.should_epoch_stop:
            run.request_epoch_end()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, TreadleWarning, stacklevel=4)

    # ------------------------------------------------ the loop's stages

    def begin_fit(self, run: treadle.Run) -> None:
        if self.user_args is not None:
            self.args = self.user_args
        elif self.args_config != run.config:  # fit(**config_changes) changed it
            self.args, self.args_config = arguments_for(run), run.config
        config, state, total = run.config, self.state, run.total_steps or 0
        state.max_steps = total
        per_epoch = self.batches_per_epoch
        updates = math.ceil(per_epoch / config.grad_accum_steps) if per_epoch else None
        state.num_train_epochs = (
            math.ceil(total / updates) if updates and total else config.max_epochs or 1
        )
        state.train_batch_size = getattr(self.train_loader, "batch_size", None) or (
            config.batch_size
        )
        state.compute_steps(self.args, total)  # type: ignore[no-untyped-call]
        # the run's cadence is the one that acts, so the state reports it
        if config.log_every:
            state.logging_steps = config.log_every
        if config.eval_every:
            state.eval_steps = config.eval_every
        if config.save_every:
            state.save_steps = config.save_every
        self.training, self.stop_requested, self.stopped_by = True, False, None
        self.fit_clock = _Clock()
        self.fit_first_step, self.fit_first_samples = run.state.step, run.state.samples_seen
        self.loss_sum = None
        self.fire(run, "on_train_begin")
        self.act(run)

    def cadence(self, run: treadle.Run) -> dict[str, bool]:
        """The flags HF's ``DefaultFlowCallback`` would set at this step end, from what the
        run is about to do: log, evaluate and save on its ``Config`` cadence; at the last step
        stop, and evaluate and save if ``eval_at_end``/``save_at_end``."""
        config, step = run.config, run.state.step
        last = bool(self.state.max_steps) and step >= self.state.max_steps
        eval_due = _due(step, config.eval_every) or (last and config.eval_at_end)
        save_due = _due(step, config.save_every) or (last and config.save_at_end)
        return {
            "should_log": _due(step, config.log_every),
            "should_evaluate": run.eval_data is not None and eval_due,
            "should_save": run.checkpoint_format is not None and save_due,
            "should_training_stop": last,
        }

    def end_step(self, run: treadle.Run, loss: torch.Tensor) -> None:
        loss = loss.detach()
        self.loss_sum = loss.clone() if self.loss_sum is None else self.loss_sum + loss
        preset = self.cadence(run)
        control = self.control
        for flag, value in preset.items():
            setattr(control, flag, getattr(control, flag) or value)
        self.fire(run, "on_step_end")
        self.warn_if_cleared(preset)
        self.act(run)

    def warn_if_cleared(self, preset: Mapping[str, bool]) -> None:
        for flag, value in preset.items():
            if value and not getattr(self.control, flag):
                self.warn_once(
                    f"cleared {flag}",
                    f"a TrainerCallback cleared TrainerControl.{flag}, which the run's Config "
                    "cadence had set; treadle cannot withdraw what its cadence schedules (the "
                    "kernel has no request to cancel a log, evaluation, save or stop), so it "
                    "happens anyway. Change the Config (log_every, eval_every, save_every, "
                    "max_steps) instead.",
                )

    def end_epoch(self, run: treadle.Run) -> None:
        config = run.config
        by_cadence = config.eval_every_epoch and run.eval_data is not None
        self.control.should_evaluate = self.control.should_evaluate or by_cadence
        self.fire(run, "on_epoch_end")
        if not self.training:
            return
        control = self.control
        # HF acts on these right after on_epoch_end; treadle's next step boundary may be in
        # the next epoch, or never: evaluate and save now, through the run's public methods.
        if control.should_log:
            run.request_log()
        if control.should_evaluate and not by_cadence and run.eval_data is not None:
            run.evaluate()
        if control.should_save and run.checkpoint_format is not None:
            run.save()
        if control.should_training_stop and not self.stop_requested and self.stopped_by:
            self.stop_requested = True
            # acted on before the next epoch begins, as HF stops after on_epoch_end
            run.request_stop(f"{self.stopped_by} set TrainerControl.should_training_stop")

    def end_fit(self, run: treadle.Run) -> None:
        steps = run.state.step - self.fit_first_step
        samples = run.state.samples_seen - self.fit_first_samples
        runtime = self.fit_clock.elapsed()
        train_loss = float(self.loss_sum.item()) / steps if self.loss_sum is not None else 0.0
        summary = {
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round(samples / max(runtime, 1e-9), 3),
            "train_steps_per_second": round(steps / max(runtime, 1e-9), 3),
            "total_flos": float(self.state.total_flos),
            "train_loss": train_loss,
        }
        self.training = False
        self.emit_log(run, summary)  # HF logs the summary, then ends training
        self.fire(run, "on_train_end")

    # ------------------------------------------------ logs and evaluations

    def emit_log(self, run: treadle.Run, logs: dict[str, float]) -> None:
        self.sync(run)
        logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.fire(run, "on_log", logs=logs)

    def log(self, run: treadle.Run, metrics: Mapping[str, float]) -> None:
        if self.pending_evals:
            evaluations, self.pending_evals = self.pending_evals, []
            merged: dict[str, float] = {}
            for logs in evaluations:  # HF: per eval set, its log and then on_evaluate
                self.emit_log(run, logs)
                self.act(run)
                self.fire(run, "on_evaluate", metrics=logs)
                self.act(run)
                merged.update(logs)
            if self.training:
                self.track_best(merged)
            return
        logs = {
            _TRAIN_KEYS.get(key, key.replace("/", "_")): value
            for key, value in metrics.items()
            if key not in ("step", "epoch")
        }
        if "learning_rate" in logs and self.step_lr is not None:
            logs["learning_rate"] = self.step_lr  # treadle logs the next step's rate
        self.emit_log(run, logs)
        self.act(run)

    def track_best(self, metrics: Mapping[str, float]) -> None:
        """``state.best_metric`` and ``best_global_step`` as HF's ``_determine_best_metric``
        keeps them (``EarlyStoppingCallback`` reads them), after ``on_evaluate``."""
        args, state = self.args, self.state
        assert args is not None
        if args.metric_for_best_model is None:
            return
        name = args.metric_for_best_model
        name = name if name.startswith("eval_") else f"eval_{name}"
        if name not in metrics:
            self.warn_once(
                f"missing {name}",
                f"TrainingArguments.metric_for_best_model is {args.metric_for_best_model!r}, "
                f"but the evaluation logged {sorted(metrics)}: no best metric is tracked.",
            )
            return
        value = metrics[name]
        if state.best_metric is None:
            state.best_metric = float("-inf") if args.greater_is_better else float("inf")
        better = value > state.best_metric if args.greater_is_better else value < state.best_metric
        if better:
            state.best_metric = value
            if str(getattr(args.save_strategy, "value", args.save_strategy)) != "no":
                state.best_global_step = state.global_step

    # ------------------------------------------------ checkpoints

    def export(self) -> dict[str, Any]:
        state = self.state
        return {
            "control": dataclasses.asdict(self.control),
            "best_metric": state.best_metric,
            "best_global_step": state.best_global_step,
            "best_model_checkpoint": state.best_model_checkpoint,
            "log_history": state.log_history,
            "callbacks": [
                {"class": type(callback).__name__, "state": _exported(callback)}
                for callback in self.callbacks
            ],
        }

    def restore(self, saved: Mapping[str, Any]) -> None:
        for flag, value in saved.get("control", {}).items():
            setattr(self.control, flag, value)
        state = self.state
        state.best_metric = saved.get("best_metric")
        state.best_global_step = saved.get("best_global_step")
        state.best_model_checkpoint = saved.get("best_model_checkpoint")
        state.log_history = list(saved.get("log_history", []))
        for callback, entry in zip(self.callbacks, saved.get("callbacks", []), strict=False):
            if entry.get("class") == type(callback).__name__ and entry.get("state"):
                for attribute, value in entry["state"].get("attributes", {}).items():
                    setattr(callback, attribute, value)


# ---------------------------------------------------------------- arguments from a run


def arguments_for(run: treadle.Run) -> TrainingArguments:
    """``TrainingArguments`` that describe the run's ``Config``, for callbacks that read
    ``args`` (pass your own ``TrainingArguments`` in ``plugins=`` to use those instead)."""
    from transformers import TrainingArguments

    config = run.config
    optimizer = run.hparams().get("optimizer")
    options = optimizer if isinstance(optimizer, dict) else {}
    extra: dict[str, Any] = {}
    for name, key in (("learning_rate", "lr"), ("weight_decay", "weight_decay")):
        if isinstance(options.get(key), int | float):
            extra[name] = float(options[key])
    if config.monitor is not None:
        extra["metric_for_best_model"] = _metric_name(config.monitor, run.eval_data)
        extra["greater_is_better"] = config.monitor_mode == "max"
    if config.eval_every is not None:
        extra["eval_steps"] = config.eval_every
    eval_strategy = "steps" if config.eval_every else "epoch" if config.eval_every_epoch else "no"
    return TrainingArguments(
        output_dir=config.output_dir,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        num_train_epochs=config.max_epochs or 1,
        gradient_accumulation_steps=config.grad_accum_steps,
        per_device_train_batch_size=config.batch_size or 8,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size or 8,
        logging_strategy="steps" if config.log_every else "no",
        logging_steps=config.log_every or 500,
        eval_strategy=eval_strategy,
        save_strategy="steps" if config.save_every else "no",
        save_steps=config.save_every or 500,
        save_total_limit=config.keep_last,
        seed=config.seed,
        dataloader_drop_last=config.drop_last,
        dataloader_num_workers=config.num_workers,
        report_to="none",
        use_cpu=run.device.type == "cpu",
        disable_tqdm=True,
        **extra,
    )


def _metric_name(metric: str, eval_data: Any) -> str:
    """treadle's metric name (``eval/loss``, ``val/loss``) as HF writes it (``eval_loss``,
    ``eval_val_loss``)."""
    name, slash, _ = metric.partition("/")
    if not slash:
        return metric
    names = [str(n) for n in eval_data] if isinstance(eval_data, Mapping) else ["eval"]
    if name not in names:
        return metric.replace("/", "_")
    return _eval_key("eval" if name == "eval" else f"eval_{name}", name, metric)


def _eval_key(prefix: str, name: str, key: str) -> str:
    return f"{prefix}_{key.removeprefix(f'{name}/')}"


def _exported(callback: TrainerCallback) -> Any:
    """An ``ExportableState`` callback's state (HF keeps it in ``trainer_state.json``)."""
    from transformers.trainer_callback import ExportableState

    return callback.state() if isinstance(callback, ExportableState) else None


# ---------------------------------------------------------------- small helpers


def _due(step: int, every: int | None) -> bool:
    return every is not None and every > 0 and step % every == 0


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _rows(batch: Any) -> int:
    """The number of samples in a batch: the first dimension of its first tensor."""
    if hasattr(batch, "shape"):
        return int(batch.shape[0]) if batch.shape else 1
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values if isinstance(values, Iterable) else ():
        if hasattr(value, "shape") and value.shape:
            return int(value.shape[0])
    return 1


class _Clock:
    """Time, batches and samples of an evaluation, prediction or fit: HF's speed metrics, and
    a prediction's loss (when the model returns one) as HF's ``predict`` reports it."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.batches = 0
        self.samples = 0
        self.loss: torch.Tensor | None = None  # sum of batch loss x rows, kept on the device

    def count(self, batch: Any, loss: Any = None) -> None:
        rows = _rows(batch)
        self.batches += 1
        self.samples += rows
        if loss is not None and hasattr(loss, "detach"):
            part = loss.detach().double() * rows
            self.loss = part if self.loss is None else self.loss + part

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def speed(self, prefix: str) -> dict[str, float]:
        runtime = self.elapsed()
        loss = {} if self.loss is None else {f"{prefix}_loss": float(self.loss) / self.samples}
        return loss | {
            f"{prefix}_runtime": round(runtime, 4),
            f"{prefix}_samples_per_second": round(self.samples / max(runtime, 1e-9), 3),
            f"{prefix}_steps_per_second": round(self.batches / max(runtime, 1e-9), 3),
        }
