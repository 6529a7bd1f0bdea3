"""Learning-rate schedules: the HF ``get_scheduler`` family, plus reduce-on-plateau.

Every factory is called as ``cosine(optimizer, total_steps=N, warmup_steps=100, **options)``
and returns an object with ``step()``, ``get_last_lr()``, ``state_dict()`` and
``load_state_dict()``; the run steps it after every optimizer step. The step-driven schedules
are ``torch.optim.lr_scheduler.LambdaLR`` over plain functions (so their state dict holds
numbers only, never a pickled callable); the formulas follow ``transformers.optimization``.
``warmup_ratio`` sets ``warmup_steps = ceil(warmup_ratio * total_steps)``.

``reduce_on_plateau`` is driven by evaluation instead: its ``step()`` does nothing and its
``on_eval_end`` hook implementation feeds the monitored metric to
``torch.optim.lr_scheduler.ReduceLROnPlateau``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from treadle.errors import ConfigError, TreadleWarning
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = [
    "PlateauScheduler",
    "constant",
    "constant_with_warmup",
    "cosine",
    "cosine_with_min_lr",
    "inverse_sqrt",
    "linear",
    "polynomial",
    "reduce_on_plateau",
    "warmup_stable_decay",
]

_Lambda = Callable[[int], float]


# ----------------------------------------------------------------------------- validation


def _entry_name(name: str) -> str:
    # Messages use the name the user wrote in the config (the entry-point name).
    return name.replace("_", "-")


def _check_options(name: str, options: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listing = ", ".join(("total_steps", "warmup_steps", "warmup_ratio", *allowed))
        raise ConfigError(
            f"scheduler {_entry_name(name)!r} got unknown option(s) "
            f"{', '.join(map(repr, unknown))}; allowed: {listing}."
        )


def _bad(name: str, option: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(
        f"scheduler {_entry_name(name)!r}: {option}={value!r} is not allowed; {allowed}."
    )


def _warmup(
    name: str,
    total_steps: int,
    warmup_steps: int,
    warmup_ratio: float,
    *,
    within_total: bool = True,
) -> int:
    """Validate ``total_steps`` and the warmup options; return the number of warmup steps."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise _bad(name, "total_steps", total_steps, "it must be a positive integer")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise _bad(name, "warmup_steps", warmup_steps, "it must be an integer >= 0")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise _bad(name, "warmup_ratio", warmup_ratio, "it must be in [0, 1]")
    if warmup_ratio and warmup_steps:
        raise ConfigError(
            f"scheduler {_entry_name(name)!r}: warmup_steps={warmup_steps} and "
            f"warmup_ratio={warmup_ratio} both given; set only one."
        )
    if warmup_ratio:
        warmup_steps = math.ceil(warmup_ratio * total_steps)
    if within_total and warmup_steps > total_steps:
        raise _bad(name, "warmup_steps", warmup_steps, f"it must be <= total_steps ({total_steps})")
    return warmup_steps


def _warmup_factor(step: int, warmup_steps: int) -> float:
    return step / max(1, warmup_steps)


def _lambda_lr(optimizer: torch.optim.Optimizer, fn: _Lambda | list[_Lambda]) -> LambdaLR:
    # torch warns when a scheduler steps before its optimizer ever did; LambdaLR's own
    # constructor does exactly that to apply the step-0 learning rate.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return LambdaLR(optimizer, fn)


def _initial_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    # The learning rate each group starts from, also when a refit builds a new scheduler
    # on an optimizer whose lr an earlier scheduler already changed.
    return [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]


# ----------------------------------------------------------------------------- schedules


def constant(
    optimizer: torch.optim.Optimizer,
    /,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    **options: Any,
) -> LambdaLR:
    """Keep the learning rate fixed.

    Args:
        optimizer: The optimizer whose learning rate to schedule.
        total_steps: Number of optimizer steps of the run.
        warmup_steps: Must be 0; use ``constant-with-warmup`` for a warmup.
        warmup_ratio: Must be 0.
        **options: None allowed.

    Returns:
        The scheduler.

    Raises:
        ConfigError: A warmup or an unknown option is given.
    """
    _check_options("constant", options, ())
    if _warmup("constant", total_steps, warmup_steps, warmup_ratio):
        raise ConfigError(
            "scheduler 'constant' has no warmup; use 'constant-with-warmup' for one, or drop "
            "warmup_steps/warmup_ratio."
        )
    return _lambda_lr(optimizer, lambda step: 1.0)


def constant_with_warmup(
    optimizer: torch.optim.Optimizer,
    /,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    **options: Any,
) -> LambdaLR:
    """Warm up linearly from 0 to the base learning rate, then keep it.

    Args:
        optimizer: The optimizer whose learning rate to schedule.
        total_steps: Number of optimizer steps of the run.
        warmup_steps: Steps of linear warmup (may exceed ``total_steps``).
        warmup_ratio: Warmup as a fraction of ``total_steps``, instead of ``warmup_steps``.
        **options: None allowed.

    Returns:
        The scheduler.

    Raises:
        ConfigError: An option is unknown or invalid.
    """
    _check_options("constant_with_warmup", options, ())
    warmup = _warmup(
        "constant_with_warmup", total_steps, warmup_steps, warmup_ratio, within_total=False
    )

    def fn(step: int) -> float:
        return _warmup_factor(step, warmup) if step < warmup else 1.0

    return _lambda_lr(optimizer, fn)


def linear(
    optimizer: torch.optim.Optimizer,
    /,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    **options: Any,
) -> LambdaLR:
    """Warm up linearly to the base learning rate, then decay linearly to 0 at ``total_steps``.

    Args:
        optimizer: The optimizer whose learning rate to schedule.
        total_steps: Step at which the learning rate reaches 0.
        warmup_steps: Steps of linear warmup.
        warmup_ratio: Warmup as a fraction of ``total_steps``, instead of ``warmup_steps``.
        **options: None allowed.

    Returns:
        The scheduler.

    Raises:
        ConfigError: An option is unknown or invalid.
    """
    _check_options("linear", options, ())
    warmup = _warmup("linear", total_steps, warmup_steps, warmup_ratio)

    def fn(step: int) -> float:
        if step < warmup:
            return _warmup_factor(step, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return _lambda_lr(optimizer, fn)


def _cosine_factor(progress: float, num_cycles: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))


def cosine(
    optimizer: torch.optim.Optimizer,
    /,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    **options: Any,
) -> LambdaLR:
    """Warm up linearly, then follow a cosine from the base learning rate down to 0.

    Args:
        optimizer: The optimizer whose learning rate to schedule.
        total_steps: Number of optimizer steps of the run.
        warmup_steps: Steps of linear warmup.
        warmup_ratio: Warmup as a fraction of ``total_steps``, instead of ``warmup_steps``.
        **options: ``num_cycles`` (default 0.5: half a period, ending at 0).

    Returns:
        The scheduler.

    Raises:
        ConfigError: An option is unknown or invalid.
    """
    _check_options("cosine", options, ("num_cycles",))
    warmup = _warmup("cosine", total_steps, warmup_steps, warmup_ratio)
    num_cycles = float(options.get("num_cycles", 0.5))

    def fn(step: int) -> float:
        if step < warmup:
            return _warmup_factor(step, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, _cosine_factor(progress, num_cycles))

    return _lambda_lr(optimizer, fn)


def cosine_with_min_lr(
    optimizer: torch.optim.Optimizer,
    /,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    **options: Any,
) -> LambdaLR:
    """Like ``cosine``, but the cosine ends at a minimum learning rate instead of 0.

    Args:
        optimizer: The optimizer whose learning rate to schedule.
        total_steps: Number of optimizer steps of the run.
        warmup_steps: Steps of linear warmup.
        warmup_ratio: Warmup as a fraction of ``total_steps``, instead of ``warmup_steps``.
        **options: Exactly one of ``min_lr`` (absolute; as in HF, relative to the
            optimizer's default lr) or ``min_lr_rate`` (fraction of each group's base lr);
            ``num_cycles`` (default 0.5).

    Returns:
        The scheduler.

    Raises:
        ConfigError: An option is unknown, invalid, or both/neither of the minimums are given.
    """
    name = "cosine_with_min_lr"
    _check_options(name, options, ("min_lr", "min_lr_rate", "num_cycles"))
    warmup = _warmup(name, total_steps, warmup_steps, warmup_ratio)
    num_cycles = float(options.get("num_cycles", 0.5))
    if ("min_lr" in options) == ("min_lr_rate" in options):
        raise ConfigError(
            f"scheduler {_entry_name(name)!r} needs exactly one of 'min_lr' (an absolute lr) "
            f"or 'min_lr_rate' (a fraction of the base lr); got {sorted(options)}."
        )
    if "min_lr" in options:
        min_lr = float(options["min_lr"])
        if min_lr < 0:
            raise _bad(name, "min_lr", min_lr, "it must be >= 0")
        rate = min_lr / float(optimizer.defaults["lr"])
    else:
        rate = float(options["min_lr_rate"])
        if not 0.0 <= rate <= 1.0:
            raise _bad(name, "min_lr_rate", rate, "it must be in [0, 1]")

    def fn(step: int) -> float:
        if step < warmup:
            return _warmup_factor(step, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, _cosine_factor(progress, num_cycles) * (1.0 - rate) + rate)

    return _lambda_lr(optimizer, fn)


def polynomial(
    optimizer: torch.optim.Optimizer,
    /,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    **options: Any,
) -> LambdaLR:
    """Warm up linearly, then decay polynomially from each group's base lr to ``lr_end``.

    Args:
        optimizer: The optimizer whose learning rate to schedule.
        total_steps: Step at which the learning rate reaches ``lr_end`` (and stays).
        warmup_steps: Steps of linear warmup.
        warmup_ratio: Warmup as a fraction of ``total_steps``, instead of ``warmup_steps``.
        **options: ``lr_end`` (default 1e-7, absolute) and ``power`` (default 1.0: linear).

    Returns:
        The scheduler.

    Raises:
        ConfigError: An option is unknown or invalid, or a base lr is not above ``lr_end``.
    """
    _check_options("polynomial", options, ("lr_end", "power"))
    warmup = _warmup("polynomial", total_steps, warmup_steps, warmup_ratio)
    lr_end = float(options.get("lr_end", 1e-7))
    power = float(options.get("power", 1.0))
    initial = _initial_lrs(optimizer)
    if any(lr <= lr_end for lr in initial):
        raise _bad("polynomial", "lr_end", lr_end, f"it must be below every base lr ({initial})")

    def make(lr_init: float) -> _Lambda:
        def fn(step: int) -> float:
            if step < warmup:
                return _warmup_factor(step, warmup)
            if step > total_steps:
                return lr_end / lr_init
            remaining = 1.0 - (step - warmup) / max(1, total_steps - warmup)
            return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init

        return fn

    return _lambda_lr(optimizer, [make(lr) for lr in initial])


def inverse_sqrt(
    optimizer: torch.optim.Optimizer,
    /,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    **options: Any,
) -> LambdaLR:
    """Warm up linearly, then decay as ``1 / sqrt((step + shift) / timescale)``.

    Args:
        optimizer: The optimizer whose learning rate to schedule.
        total_steps: Number of optimizer steps of the run (the schedule does not use it).
        warmup_steps: Steps of linear warmup (may exceed ``total_steps``).
        warmup_ratio: Warmup as a fraction of ``total_steps``, instead of ``warmup_steps``.
        **options: ``timescale`` (default: ``warmup_steps``, or 10 000 without warmup).

    Returns:
        The scheduler.

    Raises:
        ConfigError: An option is unknown or invalid.
    """
    _check_options("inverse_sqrt", options, ("timescale",))
    warmup = _warmup("inverse_sqrt", total_steps, warmup_steps, warmup_ratio, within_total=False)
    timescale = options.get("timescale")
    if timescale is None:
        timescale = warmup or 10_000
    if timescale <= 0:
        raise _bad("inverse_sqrt", "timescale", timescale, "it must be > 0")
    # The shift makes the decay start at exactly 1.0 when the warmup ends.
    shift = timescale - warmup

    def fn(step: int) -> float:
        if step < warmup:
            return _warmup_factor(step, warmup)
        return 1.0 / math.sqrt((step + shift) / timescale)

    return _lambda_lr(optimizer, fn)


_SHAPES = ("linear", "cosine", "1-sqrt")


def warmup_stable_decay(
    optimizer: torch.optim.Optimizer,
    /,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    **options: Any,
) -> LambdaLR:
    """Warm up, hold the base learning rate, then decay over the last steps (WSD).

    Args:
        optimizer: The optimizer whose learning rate to schedule.
        total_steps: Number of optimizer steps of the run; the decay ends here.
        warmup_steps: Steps of warmup.
        warmup_ratio: Warmup as a fraction of ``total_steps``, instead of ``warmup_steps``.
        **options: Exactly one of ``num_decay_steps`` or ``decay_ratio`` (decay steps =
            ``ceil(decay_ratio * total_steps)``); ``min_lr_ratio`` (default 0, the floor as a
            fraction of the base lr); ``decay_type`` and ``warmup_type`` (``"linear"``,
            ``"cosine"`` or ``"1-sqrt"``; defaults ``"cosine"`` and ``"linear"``, as in HF);
            ``num_cycles`` (default 0.5, for a cosine decay).

    Returns:
        The scheduler.

    Raises:
        ConfigError: An option is unknown or invalid, or warmup and decay exceed
            ``total_steps``.
    """
    name = "warmup_stable_decay"
    _check_options(
        name,
        options,
        (
            "num_decay_steps",
            "decay_ratio",
            "min_lr_ratio",
            "decay_type",
            "warmup_type",
            "num_cycles",
        ),
    )
    warmup = _warmup(name, total_steps, warmup_steps, warmup_ratio)
    if ("num_decay_steps" in options) == ("decay_ratio" in options):
        raise ConfigError(
            f"scheduler {_entry_name(name)!r} needs exactly one of 'num_decay_steps' or "
            f"'decay_ratio' (fraction of total_steps); got {sorted(options)}."
        )
    if "decay_ratio" in options:
        ratio = options["decay_ratio"]
        if not 0.0 <= ratio <= 1.0:
            raise _bad(name, "decay_ratio", ratio, "it must be in [0, 1]")
        decay = math.ceil(ratio * total_steps)
    else:
        decay = options["num_decay_steps"]
        if isinstance(decay, bool) or not isinstance(decay, int) or decay < 0:
            raise _bad(name, "num_decay_steps", decay, "it must be an integer >= 0")
    if warmup + decay > total_steps:
        raise ConfigError(
            f"scheduler {_entry_name(name)!r}: warmup ({warmup}) + decay ({decay}) steps exceed "
            f"total_steps ({total_steps}); lower warmup_steps/warmup_ratio or "
            "num_decay_steps/decay_ratio."
        )
    min_ratio = float(options.get("min_lr_ratio", 0.0))
    if not 0.0 <= min_ratio <= 1.0:
        raise _bad(name, "min_lr_ratio", min_ratio, "it must be in [0, 1]")
    decay_type = options.get("decay_type", "cosine")
    warmup_type = options.get("warmup_type", "linear")
    for option, value in (("decay_type", decay_type), ("warmup_type", warmup_type)):
        if value not in _SHAPES:
            raise _bad(name, option, value, f"choose one of {', '.join(_SHAPES)}")
    num_cycles = float(options.get("num_cycles", 0.5))
    stable_end = total_steps - decay

    def fn(step: int) -> float:
        if step < warmup:
            progress = step / max(1, warmup)
            if warmup_type == "linear":
                factor = progress
            elif warmup_type == "cosine":
                factor = 0.5 * (1.0 - math.cos(math.pi * progress))
            else:
                factor = 1.0 - math.sqrt(1.0 - progress)
        elif step < stable_end:
            return 1.0
        elif step < total_steps:
            progress = (step - stable_end) / max(1, decay)
            if decay_type == "linear":
                factor = 1.0 - progress
            elif decay_type == "cosine":
                factor = _cosine_factor(progress, num_cycles)
            else:
                factor = 1.0 - math.sqrt(progress)
        else:
            return min_ratio
        return max(0.0, factor * (1.0 - min_ratio) + min_ratio)

    return _lambda_lr(optimizer, fn)


# ----------------------------------------------------------------------------- plateau


def _to_json(value: Any) -> Any:
    # JSON has no inf/nan (Python would write the non-standard ``Infinity``); spell them as
    # strings, which no other field of ReduceLROnPlateau's state can hold.
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


class PlateauScheduler:
    """Reduces the learning rate when an evaluation metric stops improving.

    The run calls ``step()`` after every optimizer step; that does nothing here. The
    reduction happens in ``on_eval_end``, which the run calls because it registers every
    scheduler with its plugin manager.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, monitor: str, **plateau: Any) -> None:
        """Wrap ``ReduceLROnPlateau(optimizer, **plateau)`` and watch ``metrics[monitor]``.

        Args:
            optimizer: The optimizer whose learning rate to reduce.
            monitor: Metric key to watch, as logged (``"eval/loss"``).
            **plateau: Options of ``torch.optim.lr_scheduler.ReduceLROnPlateau``.
        """
        self.optimizer = optimizer
        self.monitor = monitor
        self.plateau = ReduceLROnPlateau(optimizer, **plateau)
        self._warned = False

    def step(self, metric: float | None = None) -> None:
        """Feed ``metric`` to the plateau detector; without one (the run's call), do nothing.

        Args:
            metric: The monitored value, for use outside a run.
        """
        if metric is not None:
            self.plateau.step(float(metric))

    def get_last_lr(self) -> list[float]:
        """The learning rate of each parameter group.

        Returns:
            One learning rate per parameter group.
        """
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    @hookimpl
    def on_eval_end(self, run: Run, name: str, metrics: Mapping[str, float]) -> None:
        """Step the plateau detector with the monitored metric of this evaluation.

        Args:
            run: The run (unused).
            name: Name of the evaluation set that just finished.
            metrics: Its metrics, keys prefixed ``"{name}/"``.
        """
        if self.monitor in metrics:
            self.step(metrics[self.monitor])
        elif self.monitor.split("/", 1)[0] == name and not self._warned:
            # The right evaluation set lacks the metric: a typo would silently never reduce.
            self._warned = True
            warnings.warn(
                f"scheduler 'reduce-on-plateau' monitors {self.monitor!r}, but evaluation "
                f"{name!r} reported only {sorted(metrics)}; the learning rate will not change.",
                TreadleWarning,
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the wrapped scheduler's counters, best value and lrs.

        Returns:
            The state.
        """
        state = {k: _to_json(v) for k, v in self.plateau.state_dict().items()}
        return {"monitor": self.monitor, "plateau": state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned.

        Args:
            state: A state from ``state_dict`` (possibly after a JSON round trip).
        """
        self.monitor = state["monitor"]
        self.plateau.load_state_dict({k: _from_json(v) for k, v in state["plateau"].items()})


_PLATEAU_OPTIONS = ("threshold_mode", "cooldown", "eps")


def reduce_on_plateau(
    optimizer: torch.optim.Optimizer,
    /,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    monitor: str = "eval/loss",
    mode: str = "min",
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    min_lr: float | list[float] = 0,
    **options: Any,
) -> PlateauScheduler:
    """Multiply the learning rate by ``factor`` after ``patience`` evaluations without progress.

    Args:
        optimizer: The optimizer whose learning rate to reduce.
        total_steps: Number of optimizer steps of the run (unused).
        warmup_steps: Must be 0: this schedule has no warmup.
        warmup_ratio: Must be 0.
        monitor: Metric key to watch, prefixed with the evaluation set's name.
        mode: ``"min"`` (lower is better) or ``"max"``.
        factor: Multiplier applied to the learning rate on a plateau, in (0, 1).
        patience: Evaluations without improvement tolerated before reducing.
        threshold: Smallest change that counts as an improvement.
        min_lr: Floor of the learning rate (one value, or one per parameter group).
        **options: ``threshold_mode`` (``"rel"``/``"abs"``), ``cooldown``, ``eps``: passed to
            ``torch.optim.lr_scheduler.ReduceLROnPlateau``.

    Returns:
        The scheduler; it listens to ``on_eval_end``.

    Raises:
        ConfigError: An option is unknown or invalid.
    """
    name = "reduce_on_plateau"
    unknown = sorted(set(options) - set(_PLATEAU_OPTIONS))
    if unknown:
        raise ConfigError(
            f"scheduler 'reduce-on-plateau' got unknown option(s) "
            f"{', '.join(map(repr, unknown))}; allowed: total_steps, monitor, mode, factor, "
            f"patience, threshold, min_lr, {', '.join(_PLATEAU_OPTIONS)}."
        )
    if _warmup(name, total_steps, warmup_steps, warmup_ratio):
        raise ConfigError(
            "scheduler 'reduce-on-plateau' has no warmup; drop warmup_steps/warmup_ratio."
        )
    if mode not in ("min", "max"):
        raise _bad(name, "mode", mode, "choose 'min' or 'max'")
    if not 0.0 < factor < 1.0:
        raise _bad(name, "factor", factor, "it must be in (0, 1)")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise _bad(name, "patience", patience, "it must be an integer >= 0")
    if not isinstance(monitor, str) or not monitor:
        raise _bad(name, "monitor", monitor, 'give a metric key such as "eval/loss"')
    try:
        return PlateauScheduler(
            optimizer,
            monitor,
            mode=mode,
            factor=factor,
            patience=patience,
            threshold=threshold,
            min_lr=min_lr,
            **options,
        )
    except ValueError as exc:
        raise ConfigError(f"scheduler 'reduce-on-plateau': {exc}") from exc
