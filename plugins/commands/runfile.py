"""Run files: the TOML form of a ``treadle.Run`` that ``treadle run`` trains.

``build_run(path, overrides)`` composes the ``Run`` a file describes; ``apply_overrides`` applies
``--set KEY=VALUE`` to a file's contents, whose values ``parse_key_values`` reads; ``RUN_KEYS``
are the top-level keys a file may hold and ``run_file_help()`` explains them (the docs site's
run-file reference is generated from these). A run file names code only by import path
(``treadle.registry.import_path``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
import textwrap
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from treadle import defaults
from treadle.components import Strategy
from treadle.config import Config
from treadle.errors import ConfigError, TreadleError
from treadle.registry import component, import_path
from treadle.run import Run, seed_everything

__all__ = ["RUN_KEYS", "apply_overrides", "build_run", "parse_key_values", "run_file_help"]

#: the top-level keys of a run file
RUN_KEYS = {
    "model", "train_data", "eval_data", "loss_fn", "config", "strategy", "precision",
    "optimizer", "scheduler", "loggers", "checkpoint", "store", "plugins",
}  # fmt: skip


def _call_factory(key: str, spec: Any) -> Any:
    """``"pkg.mod:factory"`` → ``factory()``; ``{factory = "...", **kwargs}`` → ``factory(**kwargs)``."""
    if isinstance(spec, str):
        factory, kwargs = import_path(spec), {}
    elif isinstance(spec, Mapping) and isinstance(spec.get("factory"), str):
        kwargs = {k: v for k, v in spec.items() if k != "factory"}
        factory = import_path(spec["factory"])
    else:
        raise ConfigError(
            f"{key} must be 'package.module:factory' or a table with factory = ..., "
            f"got {type(spec).__name__} {spec!r}"
        )
    if not callable(factory):
        raise ConfigError(f"{key} = {spec!r} does not name a callable")
    return _call(key, factory, kwargs)


def _call(key: str, factory: Any, options: Mapping[str, Any]) -> Any:
    """Call a factory named by the run file, its options checked against its signature first."""
    described = f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', factory)}"
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None  # a builtin without one: the call itself says what is wrong
    if signature is not None:
        try:
            signature.bind(**options)
        except TypeError as exc:
            accepted = [
                name
                for name, p in signature.parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            ]
            raise ConfigError(
                f"{key}: {described} does not accept the options {sorted(options)} ({exc}). "
                f"Accepted options: {', '.join(accepted) or 'none'}"
            ) from None
    try:
        return factory(**options)
    except TreadleError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"{key}: the factory {described} raised {type(exc).__name__}: {exc}"
        ) from exc


def _plugin_spec(spec: Any) -> Any:
    if isinstance(spec, str) and ":" in spec:
        return import_path(spec)
    if isinstance(spec, Mapping) and "import" in spec:
        target = import_path(spec["import"])
        options = {k: v for k, v in spec.items() if k != "import"}
        if isinstance(target, type):
            return _call(f"plugins ({spec['import']})", target, options)
        if options:
            raise ConfigError(
                f"plugins: {spec['import']!r} is not a class and takes no options, got "
                f"{sorted(options)}"
            )
        return target
    return spec


@contextlib.contextmanager
def _naming(path: Path, key: str | None) -> Iterator[None]:
    """Prefix any treadle error with the run file and the key it came from."""
    try:
        yield
    except TreadleError as exc:
        where = f"run file {path}, {key}: " if key else f"run file {path}: "
        if exc.args and isinstance(exc.args[0], str) and not exc.args[0].startswith("run file "):
            exc.args = (where + exc.args[0], *exc.args[1:])  # keeps its class (callers catch it)
        raise


def build_run(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Run:
    """Compose the ``Run`` a TOML run file describes, with ``overrides`` applied
    (``apply_overrides``: ``{"max_steps": 5, "optimizer.lr": 1e-3}``)."""
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read run file {path}: {exc}") from exc
    with _naming(path, "--set"):
        spec = apply_overrides(spec, overrides or {})
    unknown = set(spec) - RUN_KEYS
    if unknown:
        raise ConfigError(
            f"run file {path}: unknown keys {sorted(unknown)}; known: {sorted(RUN_KEYS)}"
        )
    for missing in ("model", "train_data"):
        if missing not in spec:
            raise ConfigError(
                f"run file {path}: '{missing}' is required (an import path to a factory)"
            )
    table = spec.get("config", {})
    if not isinstance(table, Mapping):
        raise ConfigError(
            f"run file {path}: [config] must be a table of config fields (e.g. [config] then "
            f"max_steps = 100), got {type(table).__name__} {table!r}"
        )
    with _naming(path, "[config]" + (" with --set" if overrides else "")):
        config = Config.from_dict(table)
    for directory in (str(path.resolve().parent), str(Path.cwd())):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    seed_everything(config.seed)  # the model factory draws its initial weights from here
    # the strategy first: a large model is built in its model-init context (meta, ZeRO-3)
    with _naming(path, "strategy"):
        strategy = component("strategy", spec.get("strategy", "single"), Strategy)
    with _naming(path, "model"), strategy.model_init_context():
        model = _call_factory("model", spec["model"])
    kwargs: dict[str, Any] = {"config": config, "strategy": strategy}
    for key in ("train_data", "eval_data"):
        if key in spec:
            with _naming(path, key):
                kwargs[key] = _call_factory(key, spec[key])
    if "loss_fn" in spec:
        with _naming(path, "loss_fn"):
            kwargs["loss_fn"] = import_path(spec["loss_fn"])
    for key in ("precision", "optimizer", "scheduler", "checkpoint", "store"):
        if key in spec:
            kwargs[key] = spec[key]
    # one name or table stands for a list of one, as in the Python API (loggers="jsonl")
    if "loggers" in spec:
        kwargs["loggers"] = list(defaults.sequence_of(spec["loggers"]))
    if "plugins" in spec:
        with _naming(path, "plugins"):
            kwargs["plugins"] = [_plugin_spec(p) for p in defaults.sequence_of(spec["plugins"])]
    with _naming(path, None):  # the message names the component (logger 'x', ...)
        return Run(model, **kwargs)


_COMPONENT_TABLES = ("strategy", "precision", "optimizer", "scheduler", "checkpoint", "store")
_LIST_TABLES = ("loggers", "plugins")


def apply_overrides(spec: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A run file's contents with ``--set`` overrides applied (the file is not changed).

    A key is a dotted path into the file: ``config.max_steps`` (or just ``max_steps``, any
    ``Config`` field), ``optimizer.lr``, ``strategy.name``, ``scheduler.warmup_steps``;
    ``plugins.early-stopping.patience`` and ``loggers.tensorboard.flush_secs`` set an option of
    the list entry with that name (added if the file has none); ``model`` or ``train_data``
    replace an import path. A component given by name only (``optimizer = "adamw"``) becomes
    a table (``{name = "adamw", ...}``) when an option is set.
    """
    result = copy.deepcopy(dict(spec))
    fields = set(attrs.fields_dict(Config))
    for key, value in overrides.items():
        path = key.split(".")
        if path[0] not in RUN_KEYS:
            if len(path) == 1 and path[0] in fields:
                path = ["config", *path]
            else:
                raise ConfigError(
                    f"--set {key}: {path[0]!r} is neither a Config field nor a key of a run "
                    f"file ({', '.join(sorted(RUN_KEYS))}), e.g. --set max_steps=100, "
                    "--set optimizer.lr=1e-3, --set plugins.early-stopping.patience=5"
                )
        head, rest = path[0], path[1:]
        if head in _LIST_TABLES and rest:
            if len(rest) == 1:
                raise ConfigError(
                    f"--set {key}: name an option of the {head} entry {rest[0]!r}, e.g. "
                    f"--set {head}.{rest[0]}.OPTION=VALUE (or replace the list: --set {head}=[...])"
                )
            entries: list[Any] = [
                {"name": e} if isinstance(e, str) else e
                for e in defaults.sequence_of(result.get(head, []))
            ]
            entry: dict[str, Any] | None = next(
                (e for e in entries if isinstance(e, dict) and e.get("name") == rest[0]), None
            )
            if entry is None:
                entry = {"name": rest[0]}
                entries.append(entry)
            _set_in(entry, rest[1:], value, key)
            result[head] = entries
        elif rest:
            table = result.get(head, {})
            if isinstance(table, str) and head in _COMPONENT_TABLES:
                table = {"name": table}
            if not isinstance(table, dict):
                raise ConfigError(f"--set {key}: {head} is {table!r}, not a table with options")
            _set_in(table, rest, value, key)
            result[head] = table
        else:
            result[head] = value
    return result


def _set_in(table: dict[str, Any], path: Sequence[str], value: Any, key: str) -> None:
    for part in path[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {key}: {part!r} is {table!r}, not a table")
    table[path[-1]] = value


def run_file_help() -> str:
    """What ``treadle run --help`` says: the run file's keys and ``--set``."""
    fields = textwrap.fill(", ".join(attrs.fields_dict(Config)), 88, initial_indent="    ",
                           subsequent_indent="    ")  # fmt: skip
    return f"""Train the run a TOML file describes (the same run as treadle.Run(...) in Python).

The run file:
  model = "pkg.module:factory"       required: an import path to a callable (or a table
  train_data = "pkg.module:factory"  {{factory = "...", option = ...}}); required too
  eval_data = "pkg.module:factory"   optional, as are loss_fn = "pkg.module:function" and
                                     every table below
  [config]                           fields of treadle.Config:
{fields}
  [strategy] [precision] [optimizer] [scheduler] [checkpoint] [store]
                                     name = "..." and the component's options, or just a
                                     name: optimizer = "adamw"
  [[loggers]] [[plugins]]            name = "..." and options, per entry; a plugin may be
                                     import = "pkg.module:Class" with options
`treadle plugins` lists the installed names; docs/reference/ documents every option.

--set KEY=VALUE overrides the file (VALUE is read as TOML, else as text):
  --set max_steps=100                a Config field (or --set config.max_steps=100)
  --set optimizer.lr=1e-3            an option of a component table
  --set strategy.name=ddp            another component
  --set plugins.early-stopping.patience=5
                                     an option of the list entry with that name (added if
                                     the file has none)
  --set model=pkg.other:factory      a top-level key"""


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_key_values(flag: str, items: Sequence[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` (values read as TOML, else as text) for ``--set`` / ``--option``;
    ``flag`` names the option in the error for an item without ``=``."""
    values = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{flag} expects key=value, got {item!r}")
        values[key.strip()] = _parse_value(value.strip())
    return values
