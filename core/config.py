"""``Config``: the run's plain settings, frozen and validated when built."""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from treadle.errors import ConfigError

__all__ = ["Config"]


def _fail(field: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"Config.{field} = {value!r} is not allowed: {allowed}")


def _check(ok: Callable[[Any], bool], expected: str, *, optional: bool = False) -> Any:
    """A validator refusing, as "expected ...", a value for which ``ok`` is false (None passes
    when ``optional``)."""

    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not (optional and value is None) and not ok(value):
            raise _fail(attribute.name, value, f"expected {expected}")

    return check


def _is_int(value: Any, minimum: int, maximum: float = math.inf) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum


def _int_at_least(minimum: int) -> Any:
    return _check(lambda v: _is_int(v, minimum), f"an integer >= {minimum}")


def _one_of(*choices: str) -> Any:
    return _check(lambda v: v in choices, f"one of {', '.join(map(repr, choices))}")


def _str_or_none(expected: str) -> Any:
    return _check(lambda v: isinstance(v, str), expected, optional=True)


def _path(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    # What the file system would refuse deep inside pathlib/os, refused here by name.
    if not isinstance(value, str):
        raise _fail(attribute.name, value, "expected a path (a string)")
    if not value.strip():
        raise _fail(
            attribute.name, value, "expected a non-empty path ('.' is the current directory)"
        )
    if "\0" in value:
        raise _fail(attribute.name, value, "a path cannot contain a NUL character")


_BOOL = _check(lambda v: isinstance(v, bool), "True or False")
_COUNT_OR_NONE = _check(lambda v: _is_int(v, 1), "an integer >= 1 or None", optional=True)
_SEED = _check(lambda v: _is_int(v, 0, 2**32 - 1), f"an integer from 0 to {2**32 - 1}")


@attrs.frozen(kw_only=True)
class Config:
    """How long to train, how to batch, when to log, evaluate and save.

    Every field is a primitive; ``Config.from_dict`` (used for TOML and ``dict`` configs)
    rejects unknown keys by name. Example::

        treadle.Config(max_steps=1_000, grad_accum_steps=4, log_every=10, eval_every=200,
                       save_every=500, seed=0, output_dir="runs/exp1", resume="auto")
    """

    #: optimizer steps to take in ``fit()``; with ``max_epochs``, whichever ends first.
    max_steps: int | None = attrs.field(default=None, validator=_COUNT_OR_NONE)
    #: passes over the training data; defaults to 1 when ``max_steps`` is not set.
    max_epochs: int | None = attrs.field(default=None, validator=_COUNT_OR_NONE)
    #: micro-batches per optimizer step.
    grad_accum_steps: int = attrs.field(default=1, validator=_int_at_least(1))
    #: "mean": average of micro-batch losses; "tokens": sum of per-token losses over the
    #: window divided by the number of scored tokens in the whole window.
    loss_normalization: str = attrs.field(default="mean", validator=_one_of("mean", "tokens"))
    #: per-device batch size, used when ``train_data`` is a Dataset rather than a DataLoader.
    batch_size: int | None = attrs.field(default=None, validator=_COUNT_OR_NONE)
    #: per-device evaluation batch size; defaults to ``batch_size``.
    eval_batch_size: int | None = attrs.field(default=None, validator=_COUNT_OR_NONE)
    #: shuffle the training data (seeded by ``seed`` and the epoch).
    shuffle: bool = attrs.field(default=True, validator=_BOOL)
    #: drop the last incomplete training batch.
    drop_last: bool = attrs.field(default=False, validator=_BOOL)
    #: DataLoader worker processes for loaders treadle builds.
    num_workers: int = attrs.field(default=0, validator=_int_at_least(0))
    #: log training metrics every N optimizer steps (0: only at the end).
    log_every: int = attrs.field(default=50, validator=_int_at_least(0))
    #: evaluate every N optimizer steps (None: never during the epoch).
    eval_every: int | None = attrs.field(default=None, validator=_COUNT_OR_NONE)
    #: evaluate at the end of every epoch.
    eval_every_epoch: bool = attrs.field(default=False, validator=_BOOL)
    #: evaluate once more when ``fit()`` ends (if eval data was given and not just evaluated).
    eval_at_end: bool = attrs.field(default=True, validator=_BOOL)
    #: save a checkpoint every N optimizer steps (None: never during training).
    save_every: int | None = attrs.field(default=None, validator=_COUNT_OR_NONE)
    #: save a checkpoint when ``fit()`` ends (unless the last step was just saved).
    save_at_end: bool = attrs.field(default=True, validator=_BOOL)
    #: write checkpoints in a background thread: a step waits only while the state is copied
    #: to host memory (at most one save in flight; ``fit`` returns with every save complete;
    #: the final save, and saves on stop or preemption, are written before going on).
    save_async: bool = attrs.field(default=False, validator=_BOOL)
    #: keep only the newest N checkpoints (None: keep all).
    keep_last: int | None = attrs.field(default=None, validator=_COUNT_OR_NONE)
    #: also keep the best K checkpoints by ``monitor`` (never deleted by ``keep_last``).
    keep_best: int = attrs.field(default=0, validator=_int_at_least(0))
    #: the logged metric that defines "best", e.g. "eval/loss".
    monitor: str | None = attrs.field(default=None, validator=_str_or_none("a metric name"))
    #: whether smaller ("min") or larger ("max") values of ``monitor`` are better.
    monitor_mode: str = attrs.field(default="min", validator=_one_of("min", "max"))
    #: seed for python, numpy and torch (and the data order).
    seed: int = attrs.field(default=0, validator=_SEED)
    #: ask torch for deterministic algorithms (slower on some kernels).
    deterministic: bool = attrs.field(default=False, validator=_BOOL)
    #: where checkpoints and logs go.
    output_dir: str = attrs.field(default="runs/treadle", validator=_path)
    #: None (fresh start), "auto" (newest valid checkpoint in output_dir, else fresh), or a path.
    resume: str | None = attrs.field(
        default=None, validator=[_str_or_none("'auto' or a path"), attrs.validators.optional(_path)]
    )
    #: multi-process runs: seconds a collective may wait for the other ranks (the process
    #: group's timeout, torch's default being 30 min), and seconds a rank may make no progress
    #: before its watchdog names the step, hook and plugin it is stuck in and ends it
    #: (docs/distributed.md). Raise it for saves or evaluations longer than this; None: torch's
    #: timeout and no watchdog.
    collective_timeout_s: float | int | None = attrs.field(default=600.0)

    @collective_timeout_s.validator
    def _check_collective_timeout(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is not None and not (number and 0 < value < math.inf):
            raise _fail(attribute.name, value, "expected a positive number of seconds or None")

    def __attrs_post_init__(self) -> None:
        if self.keep_best and self.monitor is None:
            raise _fail("keep_best", self.keep_best, "needs Config.monitor (the metric to rank by)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        """Build from a mapping (TOML table, JSON), rejecting unknown keys by name."""
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"a config must be a mapping of field names to values, got {type(values).__name__}"
            )
        _check_keys(values)  # before ``cls(**values)``: a key that is not a str is a TypeError
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied and validated."""
        return type(self).from_dict({**attrs.asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _check_keys(names: Any) -> None:
    """Refuse an unknown field by name, with the closest known one (every way of building)."""
    known = [field.name for field in attrs.fields(Config)]
    for key in names:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}.{hint} Known keys: {', '.join(known)}")


def _checked_init(generated: Callable[..., None]) -> Callable[..., None]:
    # attrs writes ``__init__``; wrapped so that ``Config(typo=1)``, ``from_dict``, ``replace``
    # and ``attrs.evolve`` all fail alike. Type checkers still see the generated signature.
    @functools.wraps(generated)
    def __init__(self: Config, *args: Any, **values: Any) -> None:
        if args:
            raise ConfigError(
                f"Config takes keyword arguments only (Config(max_steps=...)), got {len(args)} "
                "positional"
            )
        _check_keys(values)
        generated(self, **values)

    return __init__


setattr(Config, "__init__", _checked_init(Config.__init__))  # noqa: B010 (mypy: no assignment to a method)
