"""``Run``: composes model, data, config, components and plugins, and checks them before compute."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import random
import signal
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pluggy
import torch
from torch import nn

from treadle import checkpoint, defaults, evaluation, hookspecs, loop, registry, tracing
from treadle.components import CheckpointFormat, CheckpointStore, Logger, Precision, Strategy
from treadle.config import Config
from treadle.errors import ConfigError, PluginError, Preempted, TreadleError, TreadleWarning
from treadle.loop import END_EPOCH, EVAL, FINAL, LOG, PREEMPT, SAVE, STOP
from treadle.state import FitState, LossSum, State

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
        strategy, precision, checkpoint, store: a name, ``{"name": ..., **options}`` or an
            instance. ``checkpoint`` is the format of the tensors' files (None: never save);
            ``store`` is where checkpoints live and how they are made durable.
        optimizer: a name, ``{"name": ..., **options}``, an ``Optimizer`` or ``callable(model)``.
        scheduler: the same, or None; factories receive ``total_steps``.
        loggers: a list of logger names, option mappings or instances.
        plugins: names of installed plugins, option mappings, modules or objects with
            ``@treadle.hookimpl`` methods.
        loss_fn: ``loss_fn(outputs, batch)`` returning a scalar or a ``treadle.LossSum``. A
            batch that is a tuple or list ``(inputs..., target)`` calls ``model(*inputs)``
            (every item but the last) and ``loss_fn(outputs, batch)`` with the whole batch, so
            the target is ``batch[-1]``; a mapping calls ``model(**batch)``.

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
        store: ComponentSpec = "directory",
        plugins: Iterable[Any] = (),
        loss_fn: Callable[[Any, Any], torch.Tensor | LossSum] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        config = Config.from_dict(config) if isinstance(config, Mapping) else config
        config = Config() if config is None else config
        if not isinstance(config, Config):
            raise ConfigError(f"config must be a Config or a mapping, got {type(config).__name__}")
        self.config: Config = config
        self.model = model
        self.train_data = train_data
        self.eval_data = eval_data
        self.loss_fn = loss_fn
        self.state = State()

        self.strategy: Strategy = registry.component("strategy", strategy, Strategy)
        if precision is not None and self.strategy.owns_precision:
            raise ConfigError(
                f"strategy {self.strategy.name!r} manages numeric precision itself, so a separate "
                f"precision plugin ({registry.describe(precision)}) cannot be combined with it; configure "
                f"precision through the strategy's options instead"
            )
        self.precision: Precision = registry.component("precision", precision or "fp32", Precision)
        self.strategy.precision = self.precision
        factory = registry.factory
        self.optimizer_spec = factory("optimizer", optimizer, torch.optim.Optimizer)
        self.scheduler_spec = None if scheduler is None else factory("scheduler", scheduler, object)
        self.loggers: list[Logger] = [
            registry.component("logger", s, Logger) for s in defaults.sequence_of(loggers)
        ]
        self.checkpoint_format: CheckpointFormat | None = None
        if checkpoint is not None:
            self.checkpoint_format = registry.component("checkpoint", checkpoint, CheckpointFormat)
        if self.config.resume is not None and self.checkpoint_format is None:
            raise ConfigError("Config.resume is set but checkpoint=None: name a checkpoint format")
        self.checkpoint_store: CheckpointStore = registry.component("store", store, CheckpointStore)
        self._check_composition()

        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.total_steps: int | None = None
        self.last_checkpoint: Path | None = None
        #: the checkpoint this run's state was loaded from (``Config.resume``), else None
        self.resumed_from: Path | None = None
        self._wrapped: nn.Module | None = None
        #: what a fit keeps between steps (requests, the stop under way, ...): the loop's
        self.fit_state = FitState()

        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)
        self._registered: dict[str, int] = {}  # plugin name -> registration index
        self._register(registry.load("plugin", defaults.PLUGIN_NAME), defaults.PLUGIN_NAME)
        components = (self.strategy, self.precision, *self.loggers, self.checkpoint_format)
        for component in (*components, self.checkpoint_store):
            if component is not None:
                self._register(component, getattr(component, "name", type(component).__name__))
        for spec in defaults.sequence_of(plugins):
            self._register_plugin(spec)
        self._check_hooks()
        #: hook name -> what calls its implementations, for the hooks that have any (the
        #: kernel's own default alone is called directly); ``emit`` and the loop read it
        self.listeners: dict[str, Any] = {}
        self.refresh_listeners()
        try:
            self.emit("on_init_end", run=self)
        except Exception as exc:
            blamed = self._blame(exc)
            if blamed is not None:
                raise blamed from exc
            raise

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
            "optimizer": registry.describe(self.optimizer_spec),
            "scheduler": registry.describe(self.scheduler_spec),
            "checkpoint": self.checkpoint_format.name if self.checkpoint_format else None,
        }
        return {**self.config.to_dict(), **names}

    def eval_length(self, name: str) -> int | None:
        """The number of batches of the evaluation set ``name``, if known."""
        return self.fit_state.eval_lengths.get(name)

    # ------------------------------------------------------------------ what plugins may change

    def request_stop(self, reason: str, *, final: bool = True) -> None:
        """Stop training at the next step boundary (after that step's log, eval and save).

        A final stop (early stopping, a diverged run) is part of the run's state, like a
        finish: the checkpoint of that step records it, and a run resumed from it trains no
        further. ``final=False`` (a time budget, a planned pause) lets a resume continue, as
        after preemption.
        """
        self.fit_state.requests |= STOP | FINAL if final else STOP
        self.fit_state.stop_reason = reason

    def skip_step(self, reason: str) -> None:
        """Drop the current optimizer step; call it from ``on_before_optimizer_step``.

        The optimizer does not step, the scheduler does not advance, gradients are zeroed,
        ``state.skipped_steps`` counts it and ``state.step`` still advances (as for a step the
        precision backend skips). ``on_after_optimizer_step`` still fires.
        """
        self.fit_state.skip_reason = reason

    def request_save(self) -> None:
        """Save a checkpoint at the next step boundary."""
        self.fit_state.requests |= SAVE

    def request_eval(self) -> None:
        """Evaluate at the next step boundary."""
        self.fit_state.requests |= EVAL

    def request_log(self) -> None:
        """Log training metrics at the next step boundary."""
        self.fit_state.requests |= LOG

    def request_epoch_end(self) -> None:
        """End the current epoch at the next step boundary: the rest of its batches are skipped
        and the next epoch starts from its beginning (HF's ``should_epoch_stop``)."""
        self.fit_state.requests |= END_EPOCH

    def log(self, metrics: Mapping[str, float]) -> None:
        """Send metrics to every ``on_log`` listener, with ``step`` and ``epoch`` added."""
        record = {"step": self.state.step, "epoch": self.state.epoch, **metrics}
        self.state.last_metrics.update(record)
        monitor = self.config.monitor
        if monitor is not None and monitor in record:
            # a checkpoint of this step is ranked by it
            self.fit_state.monitor_logged, self.fit_state.monitor_step = True, self.state.step
            value, best = float(record[monitor]), self.state.best_metric
            minimize = self.config.monitor_mode == "min"
            better = best is None or (value < best if minimize else value > best)
            if better and math.isfinite(value):  # a diverged run's nan/inf is never the best
                self.state.best_metric, self.state.best_step = value, self.state.step
        self.emit("on_log", run=self, metrics=record)
        self.state.last_metrics.update(record)  # with what on_log wrappers added

    def preempt(self, reason: str, signum: int = signal.SIGTERM) -> None:
        """Save and stop at the next step boundary on every rank; ``fit`` then raises
        ``treadle.Preempted`` (exit code 128 + ``signum``). It only records the request, so a
        signal handler may call it: the defaults plugin's does, on SIGTERM and SIGINT."""
        self.fit_state.signal, self.fit_state.preempt_reason = signum, reason
        self.fit_state.preempt_requests = PREEMPT

    def is_stopping(self) -> bool:
        """Whether the current ``fit`` stops at this step boundary."""
        return self.fit_state.stopping

    def clear_stop(self) -> None:
        """Forget a stop of an earlier ``fit`` (each ``fit`` starts without one), and the final
        stop recorded by the checkpoint this run resumed from: the next ``fit`` trains on."""
        self.fit_state.stopping = False
        self.fit_state.resumed_stop = None

    def fold_tokens(self) -> None:
        """Move the scored-token count kept on the device into ``state.tokens_seen``."""
        if not isinstance(self.fit_state.tokens_pending, int):
            self.state.tokens_seen += int(self.fit_state.tokens_pending.item())
            self.fit_state.tokens_pending = 0

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate through the strategy, with the backward events around it."""
        if (plain := self.fit_state.plain_backward) is not None:  # see loop.build_step
            return plain(loss)
        # emit, inlined: this runs for every micro-batch
        if (hook := self.listeners.get("on_before_backward")) is not None:
            hook(run=self, loss=loss)
        self.strategy.backward(loss)
        if (hook := self.listeners.get("on_after_backward")) is not None:
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
        if train_data is not None or config_changes:
            self._check_composition()
        if self.train_data is None:
            raise ConfigError("no training data: pass train_data to treadle.Run or to fit()")
        fit_state = self.fit_state
        fit_state.monitor_logged = fit_state.preempted = False
        fit_state.preempt_requests, fit_state.signal, fit_state.preempt_reason = 0, None, None
        with self.checkpoint_store.hold(self):
            state: State = self._guarded(loop.fit, self)
        if self.fit_state.signal is not None or self.fit_state.preempted:
            if self.checkpoint_format is None:
                warnings.warn(
                    "the run was preempted, but checkpoint=None, so nothing was saved",
                    TreadleWarning,
                    stacklevel=2,
                )
            raise Preempted(self.fit_state.signal or signal.SIGTERM, self.last_checkpoint)
        return state

    def evaluate(self, data: Any = None) -> dict[str, float]:
        """Evaluate on ``data`` (or the run's eval data); returns and logs the metrics."""
        metrics: dict[str, float] = self._guarded(evaluation.evaluate, self, data)
        return metrics

    def predict(self, data: Any) -> list[Any]:
        """Run ``predict_step`` over ``data``; returns every batch's outputs, in order."""
        predictions: list[Any] = self._guarded(evaluation.predict, self, data)
        return predictions

    def save(self) -> Path:
        """Write a checkpoint now; returns its directory."""
        with self.checkpoint_store.hold(self):
            path: Path = self._guarded(checkpoint.save, self)
        return path

    def close(self) -> None:
        """Release the strategy's processes and engines; the run cannot train afterwards."""
        # A wrapper (DDP, an engine) must be freed before the strategy destroys the process
        # group it uses, or its destructor may abort the process at exit.
        checkpoint.finish_pending(self)  # a save interrupted by KeyboardInterrupt
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
        caller = self.listeners.get(hook)
        if caller is not None:
            caller(**kwargs)

    def provide(self, hook: str, *, optional: bool = False, **kwargs: Any) -> Any:
        """Ask a provider hook; the kernel's own default is called directly when it is alone."""
        caller = self.listeners[hook]
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
        self._registered.setdefault(unique, len(self._registered))

    def _check_hooks(self) -> None:
        known = _hook_names()
        for hook_name in dir(self.plugin_manager.hook):
            caller = getattr(self.plugin_manager.hook, hook_name)
            if isinstance(caller, pluggy.HookCaller) and not caller.has_spec():
                plugin = caller.get_hookimpls()[0].plugin_name
                close = difflib.get_close_matches(hook_name, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise PluginError(plugin, hook_name, f"no such hook.{hint}")

    def refresh_listeners(self) -> None:
        """Learn which hooks have implementations (the others are skipped by ``emit``), after
        plugins were added; the loop's step is built again from them."""
        _apply_order(self.plugin_manager, self._registered)
        tracing.trace_hooks(self.plugin_manager)
        self.listeners.clear()
        for hook_name in dir(self.plugin_manager.hook):
            caller = getattr(self.plugin_manager.hook, hook_name)
            if not isinstance(caller, pluggy.HookCaller):
                continue
            impls = caller.get_hookimpls()
            if len(impls) == 1 and impls[0].plugin_name == defaults.PLUGIN_NAME:
                self.listeners[hook_name] = impls[0].function  # the kernel's default, direct
            elif impls:
                self.listeners[hook_name] = caller
        self.fit_state.step = self.fit_state.plain_backward = None
        self.fit_state.plain_forward = False

    def add_plugin(self, plugin: Any) -> None:
        """Register one more plugin (an object, module, name or option mapping)."""
        self._register_plugin(plugin)
        self._check_hooks()
        self.refresh_listeners()

    def _register_plugin(self, spec: Any) -> None:
        """A ``plugins=`` entry: it must implement a hook, or it would silently do nothing."""
        plugin, name = registry.plugin(spec)
        if self.plugin_manager.is_registered(plugin):
            raise ConfigError(
                f"plugin {name!r} ({registry.describe(spec)}) is part of this run already (the "
                "same object twice, or one the run registers itself); pass it once."
            )
        undecorated = _undecorated_hooks(plugin)
        self._register(plugin, name)
        if not self.plugin_manager.get_hookcallers(plugin):
            self.plugin_manager.unregister(plugin)
            # a foreign plugin object (whose methods may even be named like treadle's hooks)
            adapted = registry.adapt(plugin)
            if adapted is not None:
                adapter, wrapper = adapted
                self._register(wrapper, f"{adapter}:{name}")
                return
            methods = ", ".join(undecorated)
            found = f" Its methods {methods} are named like hooks but lack the decorator."
            found = found if methods else ""
            raise ConfigError(
                f"plugin {name!r} ({registry.describe(spec)}) implements no treadle hook, so it would do "
                f"nothing.{found} Decorate its hook methods with @treadle.hookimpl (see "
                "treadle.hookspecs for the hooks). If it is a callback written for another "
                "library, install the treadle adapter package that accepts it."
            )
        _warn_undecorated(name, undecorated)

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
                for note in getattr(exc, "__notes__", ()):  # e.g. the emergency checkpoint
                    blamed.add_note(note)
                raise blamed from exc
            raise

    def _blame(self, exc: BaseException) -> PluginError | None:
        """Name the plugin and hook whose implementation raised ``exc``, if one did.

        Two instances of one class (two loggers of a kind) share their methods' code, so a
        frame is matched by its code *and* its ``self``; when neither tells, nobody is named.
        """
        if not isinstance(exc, Exception) or isinstance(exc, TreadleError):
            return None
        owners: dict[types.CodeType, list[tuple[object, str, str]]] = {}
        for hook_name, impl in _implementations(self.plugin_manager):
            code = getattr(impl.function, "__code__", None)
            if code is not None and impl.plugin_name != defaults.PLUGIN_NAME:
                owners.setdefault(code, []).append((impl.plugin, impl.plugin_name, hook_name))
        culprit = None
        traceback = exc.__traceback__
        while traceback is not None:
            candidates = owners.get(traceback.tb_frame.f_code)
            if candidates:
                culprit = _frame_owner(candidates, traceback.tb_frame) or culprit
            traceback = traceback.tb_next
        if culprit is None:
            return None
        return PluginError(culprit[0], culprit[1], f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ composition checks

    def _check_composition(self) -> None:
        """Options that contradict each other or the data, refused (or warned) before compute."""
        config = self.config
        self.checkpoint_store.check(self)
        if self.eval_data is None:
            for field, value in (
                ("eval_every", config.eval_every),
                ("eval_every_epoch", config.eval_every_epoch or None),
            ):
                if value is not None:
                    raise ConfigError(
                        f"Config.{field} = {value!r} is not allowed: no eval_data was given, so "
                        "nothing would be evaluated. Pass eval_data to treadle.Run, or unset "
                        f"{field}."
                    )

    @contextlib.contextmanager
    def _building(self, kind: str, spec: Any) -> Iterator[None]:
        """An optimizer/scheduler factory of the run's spec that fails names the spec; a
        plugin's own ``make_*`` is left to ``_blame``, which names the plugin."""
        try:
            yield
        except TreadleError:
            raise
        except Exception as exc:
            if not defaults.alone(self, f"make_{kind}"):
                raise
            raise ConfigError(
                f"{kind} {registry.describe(spec)}: building it raised {type(exc).__name__}: {exc}"
            ) from exc

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
        with self._building("optimizer", self.optimizer_spec):
            optimizer = self.provide("make_optimizer", run=self, model=self.wrapped_model)
        self.optimizer = self.strategy.wrap_optimizer(optimizer)
        # an engine that wraps model and optimizer together is built now, and called from now on
        self._wrapped = self.strategy.attach_optimizer(self.wrapped_model, self.optimizer)
        with self._building("scheduler", self.scheduler_spec):
            self.scheduler = self.provide(
                "make_scheduler", optional=True, run=self, optimizer=self.optimizer
            )
        if self.scheduler is not None:
            _warn_undecorated(
                f"scheduler:{type(self.scheduler).__name__}", _undecorated_hooks(self.scheduler)
            )
        if self.scheduler is not None and _has_hookimpls(self.scheduler):
            self._register(self.scheduler, f"scheduler:{type(self.scheduler).__name__}")
            self.refresh_listeners()


_PROVIDERS = ("compute_loss", "training_step", "eval_step", "predict_step")


def _apply_order(manager: pluggy.PluginManager, registered: Mapping[str, int]) -> None:
    """Order implementations of a hook by their plugins' ``treadle_order`` (lower first).

    Within pluggy's tryfirst / plain / trylast bands, an implementation whose plugin has a
    lower ``treadle_order`` (an int attribute of the plugin object, module or class; default
    0) is called first; among equal orders the plugin registered later is called first
    (pluggy's rule: components register before ``plugins=`` entries, which register in list
    order). pluggy calls the most recently registered first, so plugins are re-registered in
    the reverse of the wanted order, only when some plugin declares an order.
    """
    plugins = manager.list_name_plugin()
    orders = {name: _order_of(name, plugin) for name, plugin in plugins}
    if not any(orders.values()):
        return
    index = {name: registered.get(name, i) for i, (name, _) in enumerate(plugins)}
    wanted = sorted(plugins, key=lambda item: (orders[item[0]], -index[item[0]]))
    for name, plugin in plugins:
        manager.unregister(plugin, name=name)
    for name, plugin in reversed(wanted):
        manager.register(plugin, name=name)


def _implementations(manager: pluggy.PluginManager) -> Iterator[tuple[str, Any]]:
    """(hook name, implementation) for every implementation of every hook."""
    for hook_name in dir(manager.hook):
        caller = getattr(manager.hook, hook_name)
        if isinstance(caller, pluggy.HookCaller):
            for impl in caller.get_hookimpls():
                yield hook_name, impl


def _order_of(name: str, plugin: object) -> int:
    order = getattr(plugin, "treadle_order", 0)
    if isinstance(order, bool) or not isinstance(order, int):
        raise PluginError(
            name, "treadle_order", f"treadle_order = {order!r} must be an int (lower runs first)"
        )
    return order


def _has_hookimpls(obj: object) -> bool:
    return any(
        hasattr(getattr(type(obj), name, None), f"{hookspecs.PROJECT}_impl")
        for name in dir(type(obj))
    )


def _hook_names() -> list[str]:
    return sorted(n for n in dir(hookspecs) if n.startswith(("on_", "make_")) or n in _PROVIDERS)


def _undecorated_hooks(obj: object) -> list[str]:
    """Methods named like a hook that lack ``@treadle.hookimpl`` (so pluggy ignores them)."""
    found = []
    for name in _hook_names():
        attr = inspect.getattr_static(obj, name, None)
        function = getattr(attr, "__func__", attr)  # staticmethod / classmethod
        if callable(function) and not hasattr(function, f"{hookspecs.PROJECT}_impl"):
            found.append(name)
    return found


def _warn_undecorated(name: str, methods: list[str]) -> None:
    if methods:
        warnings.warn(
            f"plugin {name!r}: {', '.join(methods)} {'is' if len(methods) == 1 else 'are'} named "
            "like a treadle hook but not decorated, so it is never called. Decorate it with "
            "@treadle.hookimpl.",
            TreadleWarning,
            stacklevel=4,
        )


def _frame_owner(candidates: list[tuple[object, str, str]], frame: Any) -> tuple[str, str] | None:
    """Which registered implementation a traceback frame belongs to (None: cannot tell)."""
    if len(candidates) == 1:
        return candidates[0][1], candidates[0][2]
    this = frame.f_locals.get("self")
    for plugin, name, hook in candidates:
        if this is not None and this is plugin:
            return name, hook
    return None


def _hook_in(message: str) -> str:
    for word in message.replace("'", " ").split():
        if word.startswith(("on_", "make_")) or word in _PROVIDERS:
            return word
    return "?"
