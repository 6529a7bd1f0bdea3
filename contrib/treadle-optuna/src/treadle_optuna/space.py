"""A declarative search space: parameters named by where they go in a run file.

A parameter's name is a dotted path into the run file (``optimizer.lr``, ``config.max_steps``,
``scheduler.warmup_steps``, ``model.hidden`` for a factory option, ``plugins.early-stopping.
patience`` for a plugin's option), so the same name says what Optuna samples and where the
value is written. In TOML::

    [optimizer.lr]
    type = "float"
    low = 1e-4
    high = 1e-1
    log = true

    [config.grad_accum_steps]
    type = "categorical"
    choices = [1, 2, 4]
"""

from __future__ import annotations

import copy
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from treadle import ConfigError

if TYPE_CHECKING:
    import optuna

__all__ = ["Param", "apply", "params", "parse_space", "suggest"]

_KINDS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "categorical": {"choices"},
}
# run-file keys whose value may be a bare name ("sgd") standing for {name = "sgd"}
_COMPONENTS = {"strategy", "precision", "optimizer", "scheduler", "checkpoint"}
# run-file keys whose value may be a bare import path standing for {factory = "..."}
_FACTORIES = {"model", "train_data", "eval_data"}


@dataclass(frozen=True)
class Param:
    """One searched value: its run-file path and its Optuna distribution."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


def parse_space(source: Mapping[str, Any] | str | Path | None) -> list[Param]:
    """The parameters of a space given as a TOML file, a nested mapping (as TOML reads it) or
    a flat one (``{"optimizer.lr": {"type": "float", ...}}``); ``None`` is an empty space."""
    if source is None:
        return []
    if isinstance(source, str | Path):
        path = Path(source)
        try:
            source = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read the search space {path}: {exc}") from exc
    if not isinstance(source, Mapping):
        raise ConfigError(f"a search space is a table of parameters, got {type(source).__name__}")
    found: list[Param] = []
    _collect(source, (), found)
    if not found:
        raise ConfigError(
            "the search space declares no parameter; declare one as a table with a type, e.g. "
            '[optimizer.lr] type = "float" low = 1e-4 high = 1e-1 log = true'
        )
    return found


def _collect(table: Mapping[str, Any], prefix: tuple[str, ...], found: list[Param]) -> None:
    for key, value in table.items():
        path = (*prefix, str(key))
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"search space: {'.'.join(path)} = {value!r} is not a parameter; a parameter is "
                'a table with type = "float", "int" or "categorical"'
            )
        if "type" in value:
            found.append(_param(".".join(path), value))
        else:
            _collect(value, path, found)


def _param(name: str, table: Mapping[str, Any]) -> Param:
    kind = table["type"]
    if kind not in _KINDS:
        raise ConfigError(
            f"search space: {name}.type = {kind!r}; expected one of {', '.join(map(repr, _KINDS))}"
        )
    unknown = set(table) - _KINDS[kind] - {"type"}
    if unknown:
        raise ConfigError(
            f"search space: {name} ({kind}) has unknown keys {sorted(unknown)}; "
            f"known: {sorted(_KINDS[kind])}"
        )
    if kind == "categorical":
        choices = table.get("choices")
        if not isinstance(choices, Sequence) or isinstance(choices, str) or not choices:
            raise ConfigError(f"search space: {name}.choices must be a non-empty list")
        return Param(name, kind, choices=tuple(choices))
    low: Any = table.get("low")
    high: Any = table.get("high")
    number = int if kind == "int" else int | float
    for key, bound in (("low", low), ("high", high)):
        if isinstance(bound, bool) or not isinstance(bound, number) or not math.isfinite(bound):
            raise ConfigError(f"search space: {name}.{key} must be a finite {kind}, got {bound!r}")
    if low > high:
        raise ConfigError(f"search space: {name}: low = {low} is above high = {high}")
    log = table.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"search space: {name}.log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"search space: {name}: a log scale needs low > 0, got {low}")
    step: Any = table.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, number) or step <= 0):
        raise ConfigError(f"search space: {name}.step must be a positive {kind}, got {step!r}")
    if step is not None and log:
        raise ConfigError(f"search space: {name}: step and log cannot be combined (Optuna)")
    return Param(name, kind, low=low, high=high, log=log, step=step)


def suggest(trial: optuna.Trial, space: Sequence[Param]) -> dict[str, Any]:
    """Sample every parameter of ``space`` for ``trial`` (also kept in ``trial.params``)."""
    return {param.name: param.suggest(trial) for param in space}


def params(trial: optuna.Trial | optuna.trial.FrozenTrial, table: str) -> dict[str, Any]:
    """The trial's parameters under ``table``, without its prefix: with ``optimizer.lr`` and
    ``optimizer.weight_decay`` sampled, ``params(trial, "optimizer")`` is ``{"lr": ...,
    "weight_decay": ...}``, ready for ``treadle.Run(optimizer={"name": "adamw", **...})``."""
    prefix = table + "."
    return {name[len(prefix) :]: v for name, v in trial.params.items() if name.startswith(prefix)}


def apply(spec: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the run-file table ``spec`` with each dotted path of ``values`` set.

    A component named by a bare string (``optimizer = "sgd"``) becomes a table
    (``{name = "sgd", lr = ...}``), a factory's import path a table with ``factory = ...``; in
    the ``plugins`` list a segment is a plugin's name (or an index).
    """
    result = copy.deepcopy(dict(spec))
    for name, value in values.items():
        parts = name.split(".")
        if len(parts) < 2:
            raise ConfigError(
                f"parameter {name!r} names no place in a run file; name it by its table, e.g. "
                f"'config.{name}' or 'optimizer.{name}'"
            )
        _set(result, parts, value, name)
    return result


def _set(table: dict[str, Any], parts: list[str], value: Any, name: str) -> None:
    node: Any = table
    for depth, part in enumerate(parts[:-1]):
        child = _child(node, part, name)
        if child is None:
            child = {}
        elif isinstance(child, str) and depth == 0 and part in _COMPONENTS:
            child = {"name": child}
        elif isinstance(child, str) and depth == 0 and part in _FACTORIES:
            child = {"factory": child}
        elif isinstance(child, str) and depth == 1 and parts[0] == "plugins":
            child = {"name": child}
        elif not isinstance(child, dict | list):
            raise ConfigError(f"parameter {name!r}: {'.'.join(parts[: depth + 1])} is not a table")
        _store(node, part, child, name)
        node = child
    _store(node, parts[-1], value, name)


def _child(node: dict[str, Any] | list[Any], part: str, name: str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    index = _index(node, part)
    if index is None:
        raise ConfigError(f"parameter {name!r}: no plugin named {part!r} in the run file")
    return node[index]


def _store(node: dict[str, Any] | list[Any], part: str, value: Any, name: str) -> None:
    if isinstance(node, dict):
        node[part] = value
        return
    index = _index(node, part)
    if index is None:
        raise ConfigError(f"parameter {name!r}: no plugin named {part!r} in the run file")
    node[index] = value


def _index(items: list[Any], part: str) -> int | None:
    """A list position: an index, or the plugin entry named ``part``."""
    if part.isdigit():
        return int(part) if int(part) < len(items) else None
    for position, item in enumerate(items):
        if item == part or (isinstance(item, Mapping) and item.get("name") == part):
            return position
    return None
