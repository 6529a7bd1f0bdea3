"""``Run``: composes model, data, config, components and plugins, and checks them before compute."""

from __future__ import annotations

import difflib
import inspect
import math
import random
import signal
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pluggy
import torch
from torch import nn

from treadle import defaults, hookspecs, loop, registry
from treadle.components import CheckpointFormat, Logger, Precision, Strategy
from treadle.config import Config
from treadle.errors import ConfigError, PluginError, Preempted, TreadleError, TreadleWarning
from treadle.loop import EVAL, LOG, SAVE, STOP
from treadle.state import LossSum, State

__all__ = ["Run", "seed_everything"]

ComponentSpec = str | Mapping[str, Any] | object


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device). Call it before building the model."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Run:
    """One training run: what to train, on what, with which components and plugins.

    Args:
        model: an ``nn.Module`` whose output has ``.loss`` / ``["loss"]``, or use ``loss_fn``.
        train_data: a DataLoader, a map-style Dataset (with ``Config.batch_size``) or any
            re-iterable of batches. May also be given to ``fit()``.
        eval_data: the same kinds, or a mapping of names to them.
        config: a ``Config`` or a mapping of its fields.
        strategy, precision, checkpoint: a name, ``{"name": ..., **options}`` or an instance.
        optimizer: a name, ``{"name": ..., **options}``, an ``Optimizer`` or ``callable(model)``.
        scheduler: the same, or None; factories receive ``total_steps``.
        loggers: a list of logger names, option mappings or instances.
        plugins: names of installed plugins, option mappings, modules or objects with
            ``@treadle.hookimpl`` methods.
        loss_fn: ``loss_fn(outputs, batch)`` returning a scalar or a ``treadle.LossSum``.

    Example::

        run = treadle.Run(model=model, train_data=loader, config=treadle.Config(max_steps=100),
                          optimizer={"name": "adamw", "lr": 3e-4}, plugins=[MyPlugin()])
        run.fit()
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Any = None,
        eval_data: Any = None,
        *,
        config: Config | Mapping[str, Any] | None = None,
        strategy: ComponentSpec = "single",
        precision: ComponentSpec | None = None,
        optimizer: ComponentSpec | Callable[[nn.Module], torch.optim.Optimizer] = "adamw",
        scheduler: ComponentSpec | None = None,
        loggers: Iterable[ComponentSpec] = ("console",),
        checkpoint: ComponentSpec | None = "safetensors",
        plugins: Iterable[Any] = (),
        loss_fn: Callable[[Any, Any], torch.Tensor | LossSum] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if isinstance(config, Mapping):
            config = Config.from_dict(config)
        self.config: Config = config if config is not None else Config()
        if not isinstance(self.config, Config):
            raise ConfigError(
                f"config must be a treadle.Config or a mapping, got {type(config).__name__}"
            )
        self.model = model
        self.train_data = train_data
        self.eval_data = eval_data
        self.loss_fn = loss_fn
        self.state = State()

        self.strategy: Strategy = _component("strategy", strategy, Strategy)
        if precision is not None and self.strategy.owns_precision:
            raise ConfigError(
                f"strategy {self.strategy.name!r} manages numeric precision itself, so a separate "
                f"precision plugin ({_describe(precision)}) cannot be combined with it; configure "
                f"precision through the strategy's options instead"
            )
        self.precision: Precision = _component("precision", precision or "fp32", Precision)
        self.strategy.precision = self.precision
        self.optimizer_spec = _factory_spec("optimizer", optimizer, torch.optim.Optimizer)
        self.scheduler_spec = (
            None if scheduler is None else _factory_spec("scheduler", scheduler, object)
        )
        self.loggers: list[Logger] = [
            _component("logger", s, Logger) for s in defaults.sequence_of(loggers)
        ]
        self.checkpoint_format: CheckpointFormat | None = (
            None if checkpoint is None else _component("checkpoint", checkpoint, CheckpointFormat)
        )
        if self.config.resume is not None and self.checkpoint_format is None:
            raise ConfigError("Config.resume is set but checkpoint=None: name a checkpoint format")

        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.total_steps: int | None = None
        self.last_checkpoint: Path | None = None
        self._wrapped: nn.Module | None = None
        self._requests = 0
        self._stop_reason: str | None = None
        self._skip_reason: str | None = None
        self._eval_lengths: dict[str, int | None] = {}
        self._resumed = False
        self._stopping = False
        self._batches_per_epoch: int | None = None
        self._tokens_pending: torch.Tensor | int = 0
        self._last_eval_step: int | None = None
        self._last_save_step: int | None = None
        # checkpoints and preemption (treadle.checkpoint, treadle.loop.preemption)
        self._monitor_step: int | None = None
        self._train_loader: Any = None
        self._preempt_requests = 0
        self._preempted = False
        self._preempt_reason: str | None = None
        self._signal: int | None = None

        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)
        self._register(defaults, defaults.PLUGIN_NAME)
        for component in (self.strategy, self.precision, *self.loggers, self.checkpoint_format):
            if component is not None:
                self._register(component, getattr(component, "name", type(component).__name__))
        for spec in defaults.sequence_of(plugins):
            plugin, name = _plugin(spec)
            self._register(plugin, name)
        self._check_hooks()
        self._listeners: dict[str, Any] = {}
        self._plain_step = False  # loop.plain_step_applies, asked at each refresh
        self._refresh_listeners()
        self.emit("on_init_end", run=self)

    # ------------------------------------------------------------------ what plugins read

    @property
    def device(self) -> torch.device:
        return self.strategy.device

    @property
    def is_main_process(self) -> bool:
        return self.strategy.is_main_process

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def wrapped_model(self) -> nn.Module:
        """The model as the strategy wrapped it (DDP, FSDP, an engine); call this one."""
        return self._wrapped if self._wrapped is not None else self.model

    def hparams(self) -> dict[str, Any]:
        """The run's configuration as flat, JSON-serialisable values (for loggers)."""
        names = {
            "strategy": self.strategy.name,
            "precision": self.precision.name,
            "optimizer": _describe(self.optimizer_spec),
            "scheduler": _describe(self.scheduler_spec),
            "checkpoint": self.checkpoint_format.name if self.checkpoint_format else None,
        }
        return {**self.config.to_dict(), **names}

    def eval_length(self, name: str) -> int | None:
        """The number of batches of the evaluation set ``name``, if known."""
        return self._eval_lengths.get(name)

    # ------------------------------------------------------------------ what plugins may change

    def request_stop(self, reason: str) -> None:
        """Stop training at the next step boundary (after that step's log, eval and save)."""
        self._requests |= STOP
        self._stop_reason = reason

    def skip_step(self, reason: str) -> None:
        """Drop the current optimizer step; call it from ``on_before_optimizer_step``.

        The optimizer does not step, the scheduler does not advance, gradients are zeroed,
        ``state.skipped_steps`` counts it and ``state.step`` still advances (as for a step the
        precision backend skips). ``on_after_optimizer_step`` still fires.
        """
        self._skip_reason = reason

    def request_save(self) -> None:
        """Save a checkpoint at the next step boundary."""
        self._requests |= SAVE

    def request_eval(self) -> None:
        """Evaluate at the next step boundary."""
        self._requests |= EVAL

    def request_log(self) -> None:
        """Log training metrics at the next step boundary."""
        self._requests |= LOG

    def log(self, metrics: Mapping[str, float]) -> None:
        """Send metrics to every ``on_log`` listener, with ``step`` and ``epoch`` added."""
        record = {"step": self.state.step, "epoch": self.state.epoch, **metrics}
        self.state.last_metrics.update(record)
        monitor = self.config.monitor
        if monitor is not None and monitor in record:
            self._monitor_step = self.state.step  # a checkpoint of this step is ranked by it
            value = float(record[monitor])
            best = self.state.best_metric
            better = best is None or (
                value < best if self.config.monitor_mode == "min" else value > best
            )
            if better and math.isfinite(value):  # a diverged run's nan/inf is never the best
                self.state.best_metric, self.state.best_step = value, self.state.step
        self.emit("on_log", run=self, metrics=record)
        self.state.last_metrics.update(record)  # with what on_log wrappers added

    def is_stopping(self) -> bool:
        """Whether the current ``fit`` stops at this step boundary."""
        return self._stopping

    def clear_stop(self) -> None:
        """Forget a stop of an earlier ``fit`` (each ``fit`` starts without one)."""
        self._stopping = False

    def fold_tokens(self) -> None:
        """Move the scored-token count kept on the device into ``state.tokens_seen``."""
        if not isinstance(self._tokens_pending, int):
            self.state.tokens_seen += int(self._tokens_pending.item())
            self._tokens_pending = 0

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate through the strategy, with the backward events around it."""
        # emit, inlined: this runs for every micro-batch (see loop._train_step)
        if (hook := self._listeners.get("on_before_backward")) is not None:
            hook(run=self, loss=loss)
        self.strategy.backward(loss)
        if (hook := self._listeners.get("on_after_backward")) is not None:
            hook(run=self)

    # ------------------------------------------------------------------ entry points

    def fit(self, train_data: Any = None, **config_changes: Any) -> State:
        """Train until ``max_steps`` / ``max_epochs`` (totals over the run's life) or a stop.

        ``train_data`` replaces the run's training data; ``config_changes`` replace config
        fields. Model, optimizer, scheduler and state are kept between calls. With
        ``Config.resume``, the first ``fit`` first loads the checkpoint it names.

        Preemption: while ``fit`` runs in the main thread, SIGTERM or SIGINT makes every rank
        finish the current step, save a checkpoint and stop; ``fit`` then raises
        ``treadle.Preempted``, a ``SystemExit`` whose exit code is 128 + the signal's
        number (143 for SIGTERM, 130 for SIGINT). A second signal acts at once, as it would
        without treadle. See ``docs/checkpoints.md``.

        Raises:
            treadle.Preempted: a signal stopped the run (after saving).
        """
        if train_data is not None:
            self.train_data = train_data
        if config_changes:
            self.config = self.config.replace(**config_changes)
        if self.train_data is None:
            raise ConfigError("no training data: pass train_data to treadle.Run or to fit()")
        with loop.preemption(self):
            state: State = self._guarded(loop.fit, self)
        if self._signal is not None or self._preempted:
            if self.checkpoint_format is None:
                warnings.warn(
                    "the run was preempted, but checkpoint=None, so nothing was saved",
                    TreadleWarning,
                    stacklevel=2,
                )
            raise Preempted(self._signal or signal.SIGTERM, self.last_checkpoint)
        return state

    def evaluate(self, data: Any = None) -> dict[str, float]:
        """Evaluate on ``data`` (or the run's eval data); returns and logs the metrics."""
        metrics: dict[str, float] = self._guarded(loop.evaluate, self, data)
        return metrics

    def predict(self, data: Any) -> list[Any]:
        """Run ``predict_step`` over ``data``; returns every batch's outputs, in order."""
        predictions: list[Any] = self._guarded(loop.predict, self, data)
        return predictions

    def save(self) -> Path:
        """Write a checkpoint now; returns its directory."""
        from treadle import checkpoint

        path: Path = self._guarded(checkpoint.save, self)
        return path

    def close(self) -> None:
        """Release the strategy's processes and engines; the run cannot train afterwards."""
        # A wrapper (DDP, an engine) must be freed before the strategy destroys the process
        # group it uses, or its destructor may abort the process at exit.
        if self._wrapped is not self.model:
            self._wrapped = None
        self.strategy.teardown()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ hooks

    def emit(self, hook: str, **kwargs: Any) -> None:
        """Fire an event; an event nobody listens to costs one dictionary lookup."""
        caller = self._listeners.get(hook)
        if caller is not None:
            caller(**kwargs)

    def provide(self, hook: str, *, optional: bool = False, **kwargs: Any) -> Any:
        """Ask a provider hook; the kernel's own default is called directly when it is alone."""
        caller = self._listeners[hook]
        result = caller(**kwargs)
        if result is None and not optional:
            raise TreadleError(f"no implementation of {hook!r} returned a value")
        return result

    def _register(self, plugin: object, name: str) -> None:
        unique, n = name, 1
        while self.plugin_manager.has_plugin(unique):
            n += 1
            unique = f"{name}#{n}"
        try:
            self.plugin_manager.register(plugin, name=unique)
        except pluggy.PluginValidationError as exc:
            raise PluginError(unique, _hook_in(str(exc)), str(exc)) from None

    def _check_hooks(self) -> None:
        known = sorted(
            n for n in dir(hookspecs) if n.startswith(("on_", "make_")) or n in _PROVIDERS
        )
        for hook_name in dir(self.plugin_manager.hook):
            caller = getattr(self.plugin_manager.hook, hook_name)
            if isinstance(caller, pluggy.HookCaller) and not caller.has_spec():
                plugin = caller.get_hookimpls()[0].plugin_name
                close = difflib.get_close_matches(hook_name, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise PluginError(plugin, hook_name, f"no such hook.{hint}")

    def _refresh_listeners(self) -> None:
        """Learn which hooks have implementations; the others are skipped by ``emit``."""
        self._listeners.clear()
        for hook_name in dir(self.plugin_manager.hook):
            caller = getattr(self.plugin_manager.hook, hook_name)
            if not isinstance(caller, pluggy.HookCaller):
                continue
            impls = caller.get_hookimpls()
            if len(impls) == 1 and impls[0].plugin_name == defaults.PLUGIN_NAME:
                self._listeners[hook_name] = impls[0].function  # the kernel's default, direct
            elif impls:
                self._listeners[hook_name] = caller
        self._plain_step = loop.plain_step_applies(self)

    def add_plugin(self, plugin: Any) -> None:
        """Register one more plugin (an object, module, name or option mapping)."""
        obj, name = _plugin(plugin)
        self._register(obj, name)
        self._check_hooks()
        self._refresh_listeners()

    def _guarded(self, function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(*args)
        except BaseException as exc:
            try:
                self.emit("on_exception", run=self, exception=exc)
            except Exception as inner:  # the original error matters more
                exc.add_note(f"(an on_exception hook also failed: {inner!r})")
            blamed = self._blame(exc)
            if blamed is not None:
                raise blamed from exc
            raise

    def _blame(self, exc: BaseException) -> PluginError | None:
        """Name the plugin and hook whose implementation raised ``exc``, if one did."""
        if not isinstance(exc, Exception) or isinstance(exc, TreadleError):
            return None
        owners = {}
        for hook_name in dir(self.plugin_manager.hook):
            caller = getattr(self.plugin_manager.hook, hook_name)
            if isinstance(caller, pluggy.HookCaller):
                for impl in caller.get_hookimpls():
                    if impl.plugin_name != defaults.PLUGIN_NAME:
                        owners[impl.function.__code__] = (impl.plugin_name, hook_name)
        culprit = None
        traceback = exc.__traceback__
        while traceback is not None:
            culprit = owners.get(traceback.tb_frame.f_code, culprit)
            traceback = traceback.tb_next
        if culprit is None:
            return None
        return PluginError(culprit[0], culprit[1], f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ set-up, once

    def setup(self) -> None:
        """Place and wrap the model (idempotent; ``fit``/``evaluate``/``predict`` call it)."""
        if self._wrapped is not None:
            return
        self.strategy.setup(self)
        if self.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(self.config.seed)
        if self.config.deterministic:
            torch.use_deterministic_algorithms(True)
        self._wrapped = self.strategy.wrap_model(self.model)

    def setup_optimizer(self) -> None:
        if self.optimizer is not None:
            return
        optimizer = self.provide("make_optimizer", run=self, model=self.wrapped_model)
        self.optimizer = self.strategy.wrap_optimizer(optimizer)
        # an engine that wraps model and optimizer together is built now, and called from now on
        self._wrapped = self.strategy.attach_optimizer(self.wrapped_model, self.optimizer)
        self.scheduler = self.provide(
            "make_scheduler", optional=True, run=self, optimizer=self.optimizer
        )
        if self.scheduler is not None and _has_hookimpls(self.scheduler):
            self._register(self.scheduler, f"scheduler:{type(self.scheduler).__name__}")
            self._refresh_listeners()


_PROVIDERS = ("compute_loss", "training_step", "eval_step", "predict_step")


def _has_hookimpls(obj: object) -> bool:
    return any(
        hasattr(getattr(type(obj), name, None), f"{hookspecs.PROJECT}_impl")
        for name in dir(type(obj))
    )


def _hook_in(message: str) -> str:
    for word in message.replace("'", " ").split():
        if word.startswith(("on_", "make_")) or word in _PROVIDERS:
            return word
    return "?"


def _describe(spec: Any) -> Any:
    if spec is None or isinstance(spec, str | int | float | bool):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2:
        factory, options = spec
        return {"name": getattr(factory, "__name__", str(factory)), **_jsonable(options)}
    if isinstance(spec, Mapping):
        return _jsonable(spec)
    return type(spec).__name__


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, str | int | float | bool | type(None)) else repr(v)
        for k, v in options.items()
    }


def _split_spec(kind: str, spec: Any) -> tuple[str, dict[str, Any]] | None:
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


def _instantiate(kind: str, name: str, target: Any, options: Mapping[str, Any]) -> Any:
    try:
        inspect.signature(target).bind(**options)
    except TypeError as exc:
        try:
            allowed = ", ".join(
                p
                for p in inspect.signature(target).parameters
                if p not in ("self", "args", "kwargs")
            )
        except (TypeError, ValueError):
            allowed = "?"
        raise ConfigError(
            f"{kind} {name!r}: invalid options {sorted(options)}: {exc}. Allowed options: {allowed or 'none'}"
        ) from None
    return target(**options)


def _component(kind: str, spec: Any, base: type) -> Any:
    split = _split_spec(kind, spec)
    if split is None:
        if isinstance(spec, base):
            return spec
        raise ConfigError(
            f"{kind} must be a name, a {{'name': ..., **options}} mapping or a "
            f"{base.__module__}.{base.__qualname__} instance; got {type(spec).__name__}"
        )
    name, options = split
    target = registry.load(kind, name)
    component = _instantiate(kind, name, target, options)
    if not isinstance(component, base):
        raise TreadleError(
            f"{kind} {name!r} built a {type(component).__name__}, which is not a {base.__qualname__}"
        )
    return component


def _factory_spec(kind: str, spec: Any, instance_type: type) -> Any:
    """Optimizer / scheduler: resolved to (factory, options) now, built at fit."""
    split = _split_spec(kind, spec)
    if split is not None:
        name, options = split
        factory = registry.load(kind, name)
        return factory, options
    if isinstance(spec, instance_type) and instance_type is not object:
        return spec
    if callable(spec):
        return spec, {}
    if instance_type is object and hasattr(spec, "step"):
        return spec
    raise ConfigError(
        f"{kind} must be a name, a {{'name': ..., **options}} mapping, an instance or a callable; got {type(spec).__name__}"
    )


def _plugin(spec: Any) -> tuple[object, str]:
    split = _split_spec("plugin", spec)
    if split is not None:
        name, options = split
        target = registry.load("plugin", name)
        if isinstance(target, type):
            return _instantiate("plugin", name, target, options), name
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
