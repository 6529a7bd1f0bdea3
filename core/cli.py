"""The ``treadle`` command: ``run RUN.toml``, ``launch``, ``plugins``, ``export CKPT OUT``, ``plot RUN_DIR``,
``demo``."""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import json
import sys
import textwrap
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from treadle import defaults, hookspecs, registry
from treadle.components import Strategy
from treadle.config import Config
from treadle.errors import ConfigError, TreadleError
from treadle.registry import component
from treadle.run import Run, seed_everything

__all__ = ["apply_overrides", "build_run", "main", "parse_key_values"]

_RUN_KEYS = {
    "model", "train_data", "eval_data", "loss_fn", "config", "strategy", "precision",
    "optimizer", "scheduler", "loggers", "checkpoint", "plugins",
}  # fmt: skip


def import_path(path: str) -> Any:
    """Resolve ``"package.module:attribute"``: the only code a run file may name."""
    if not isinstance(path, str):
        raise ConfigError(
            f"expected an import path 'package.module:attribute', got {type(path).__name__} "
            f"{path!r}"
        )
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{path!r} is not an import path of the form 'package.module:attribute'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} (from {path!r}): {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(
                f"{module_name!r} has no attribute {attribute!r} (from {path!r})"
            ) from None
    return target


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
    unknown = set(spec) - _RUN_KEYS
    if unknown:
        raise ConfigError(
            f"run file {path}: unknown keys {sorted(unknown)}; known: {sorted(_RUN_KEYS)}"
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
    for key in ("precision", "optimizer", "scheduler", "checkpoint"):
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


_COMPONENT_TABLES = ("strategy", "precision", "optimizer", "scheduler", "checkpoint")
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
        if path[0] not in _RUN_KEYS:
            if len(path) == 1 and path[0] in fields:
                path = ["config", *path]
            else:
                raise ConfigError(
                    f"--set {key}: {path[0]!r} is neither a Config field nor a key of a run "
                    f"file ({', '.join(sorted(_RUN_KEYS))}), e.g. --set max_steps=100, "
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


def _run_file_help() -> str:
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
  [strategy] [precision] [optimizer] [scheduler] [checkpoint]
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


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = parse_key_values("--set", args.set)
    with build_run(args.file, overrides) as run:
        run.fit()
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    entries = list(registry.installed())
    if args.json:  # for tools: every installed name, as the registry reads it
        records = [
            {**entry._asdict(), **(_details(entry) if args.verbose else {})} for entry in entries
        ]
        print(json.dumps(records, indent=1))
        return 0
    if not entries:
        print("no treadle plugins installed")
    widths = [max((len(text) for text in column), default=0) for column in (
        [e.name for e in entries], [f"{e.distribution} {e.version}" for e in entries])]  # fmt: skip
    kind = None
    for entry in entries:
        if entry.kind != kind:
            kind = entry.kind
            print(f"{kind}:")
        source = f"{entry.distribution} {entry.version}"
        print(f"  {entry.name:<{widths[0]}}  {source:<{widths[1]}}  {entry.value}")
        if args.verbose:
            details = _details(entry)
            for field in ("error", "hooks", "options"):
                if details.get(field):
                    shown = details[field]
                    text = shown if isinstance(shown, str) else ", ".join(shown)
                    print(textwrap.fill(text, 96, initial_indent=f"      {field}: ",
                                        subsequent_indent=" " * 8))  # fmt: skip
    for entry, why in registry.blocked():
        print(f"hidden by {why}: {entry.kind} {entry.name} ({entry.distribution} {entry.version})")
    return 0


def _details(entry: registry.Entry) -> dict[str, Any]:
    """What ``--verbose`` adds (this imports the entry point): hooks implemented, options."""
    try:
        target = registry.load(entry.kind, entry.name)
    except TreadleError as exc:
        return {"error": str(exc)}
    hooks = sorted(
        name
        for name in dir(hookspecs)
        if hasattr(getattr(target, name, None), f"{hookspecs.PROJECT}_impl")
    )
    return {"hooks": hooks, "options": _options(target)}


def _options(target: Any) -> list[str]:
    try:
        found = registry.options(target)
    except (TypeError, ValueError):
        return []
    return [
        option.name
        + (f": {option.type}" if option.type and not option.name.startswith("**") else "")
        + (f" = {option.default}" if option.default is not None else "")
        for option in found
    ]


def _cmd_export(args: argparse.Namespace) -> int:
    from treadle import checkpoint

    options = parse_key_values("--option", args.option)
    fmt = {"name": args.format, **options} if options else args.format
    out = checkpoint.export(args.checkpoint, args.out, format=fmt)
    print(f"exported the weights of {checkpoint.resolve(args.checkpoint)} to {out}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from treadle.plugins import plot

    print(plot.plot_runs(args.run_dir, args.out))
    return 0


def _cmd_demo(arguments: list[str]) -> int:
    from treadle.plugins import demo

    return int(demo.main(arguments))


_LAUNCH_HELP = """Train RUN.toml on several processes: torchrun starts `python -m treadle run RUN.toml`
on each (gloo or NCCL, chosen by the run's strategy).

treadle's own options:
  --launcher NAME    first, if given: a strategy's own launcher instead of torchrun
                     (e.g. --launcher deepspeed [deepspeed's options] RUN.toml)
  RUN.toml           the run file, where torchrun expects the training script
  after RUN.toml     options of `treadle run`, e.g. --set max_steps=100 --set
                     optimizer.lr=1e-3 (see `treadle run --help`)

Example:
  treadle launch --nproc-per-node 2 run.toml --set strategy.name=ddp

torchrun's options follow."""


def launch_argv(argv: Sequence[str]) -> list[str]:
    """torchrun's argv for ``treadle launch [torchrun options] RUN.toml [run options]``.

    The torchrun options (``--nproc-per-node``, ``--nnodes``, ``--rdzv-*``, ...) pass through
    unchanged and the script becomes ``-m treadle run RUN.toml [run options]``.
    """
    from torch.distributed import run as torchrun

    parser = torchrun.get_args_parser()
    parser.prog = "treadle launch"
    parser.usage = (
        "treadle launch [--launcher NAME] [torchrun options] RUN.toml [treadle run options]"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = _LAUNCH_HELP
    parser.epilog = "(the options above are torchrun's, passed to it unchanged)"
    args = parser.parse_args(list(argv))
    if args.module or args.no_python:
        raise ConfigError(
            "treadle launch starts `python -m treadle run RUN.toml`; torchrun's -m/--module and "
            "--no-python do not apply (use torchrun directly for another program)"
        )
    tail = [args.training_script, *args.training_script_args]
    flags = list(argv)[: len(argv) - len(tail)]
    return [*flags, "-m", "treadle", "run", *tail]


def split_launcher(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``--launcher NAME`` (first, if given) and the rest: ``("torchrun", argv)`` by default.

    A launcher other than torchrun is a strategy's own (its class's ``launch(argv)``, e.g.
    ``--launcher deepspeed``): the kernel knows no launcher but torch's.
    """
    argv = list(argv)
    name = "torchrun"
    if argv[:1] == ["--launcher"]:
        if len(argv) < 2:
            raise ConfigError("--launcher needs a name: torchrun, or a strategy with a launcher")
        name, argv = argv[1], argv[2:]
    elif argv and argv[0].startswith("--launcher="):
        name, argv = argv[0].partition("=")[2], argv[1:]
    return name, argv


def _strategy_launch(name: str, argv: Sequence[str]) -> int:
    strategy = registry.load("strategy", name)
    launch = getattr(strategy, "launch", None)
    if launch is None:
        raise ConfigError(
            f"--launcher {name!r}: strategy {name!r} has no launcher of its own; "
            "use the default (torchrun)"
        )
    return int(launch(list(argv)))


def _cmd_launch(argv: Sequence[str]) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    launcher, argv = split_launcher(argv)
    if launcher != "torchrun":
        return _strategy_launch(launcher, argv)
    try:
        torchrun.main(launch_argv(argv))
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        print(f"treadle: error: {exc.get_first_failure()[1].message or exc}", file=sys.stderr)
        return next((code for code in codes if code > 0), 1)
    return 0


def _version() -> str:
    from treadle import __version__

    return __version__


_BUILTIN_COMMANDS = ("run", "launch", "plugins", "export", "plot", "demo")


def _installed_command(name: str) -> Any:
    """``treadle NAME ...`` for a ``treadle.command`` entry point: a callable taking the
    arguments after NAME and returning the exit code (the kernel's CLI names no such package)."""

    def command(arguments: list[str]) -> int:
        return int(registry.load("command", name)(arguments))

    return command


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # `launch` and `demo` hand their options on untouched (to torchrun's parser, to the demo's):
    # argparse's subcommands cannot take unknown options ahead of a positional.
    passthrough = {"launch": _cmd_launch, "demo": _cmd_demo}
    name = arguments[0] if arguments else None
    if name not in (None, *_BUILTIN_COMMANDS) and name in registry.entries("command"):
        # a subcommand an installed package declares (``treadle.command`` entry points)
        passthrough[name] = _installed_command(name)
    if arguments[:1] and arguments[0] in passthrough:
        try:
            return passthrough[arguments[0]](arguments[1:])
        except TreadleError as exc:
            print(f"treadle: error: {exc}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(
        prog="treadle", description="A microkernel for training PyTorch models."
    )
    parser.add_argument("--version", action="version", version=f"treadle {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser(
        "run",
        help="train the run described by a TOML file",
        description=_run_file_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_parser.add_argument("file", help="the run file (TOML)")
    run_parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any value of the run file (repeatable; see above)",
    )
    run_parser.set_defaults(handler=_cmd_run)
    plugins_parser = commands.add_parser(
        "plugins", help="list installed plugins by kind (imports none unless --verbose)"
    )
    plugins_parser.add_argument(
        "--json", action="store_true", help="as JSON: kind, name, value, distribution, version"
    )
    plugins_parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also the hooks each implements and its options (imports each plugin)",
    )
    plugins_parser.set_defaults(handler=_cmd_plugins)
    export_parser = commands.add_parser(
        "export", help="write a checkpoint's weights as a weights-only folder (any format)"
    )
    export_parser.add_argument(
        "checkpoint", help="a checkpoint directory, a checkpoints/ directory or a run's output"
    )
    export_parser.add_argument("out", help="the folder to create")
    export_parser.add_argument(
        "--format",
        default="safetensors",
        help="checkpoint format to write, any installed name (default: safetensors)",
    )
    export_parser.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the format, e.g. --format hf --option config=path/to/model (repeatable)",
    )
    export_parser.set_defaults(handler=_cmd_export)
    commands.add_parser(
        "launch",
        add_help=False,
        help="train RUN.toml on several processes through torchrun: "
        "treadle launch --nproc-per-node N [torchrun options] RUN.toml (or DeepSpeed's "
        "launcher: treadle launch --launcher deepspeed [deepspeed options] RUN.toml)",
    )
    plot_parser = commands.add_parser(
        "plot",
        help="draw runs' loss, learning rate, eval metrics and throughput as one PNG",
    )
    plot_parser.add_argument(
        "run_dir", nargs="+", help="a run's output directory, or its metrics.jsonl; several compare"
    )
    plot_parser.add_argument(
        "-o",
        "--out",
        default=None,
        help="the PNG to write (default: RUN_DIR/metrics.png; ./comparison.png for several runs)",
    )
    plot_parser.set_defaults(handler=_cmd_plot)
    demo_parser = commands.add_parser("demo", help="train a small transformer on a generated task")
    demo_parser.add_argument("options", nargs="*", help="see `treadle demo --help`")
    for name, declared in sorted(registry.entries("command").items()):
        if name not in _BUILTIN_COMMANDS:  # listed in --help; run before parsing, above
            source = ", ".join(f"{e.distribution} {e.version}" for e in declared)
            commands.add_parser(name, add_help=False, help=f"installed by {source}")
    args = parser.parse_args(arguments)
    try:
        return int(args.handler(args))
    except TreadleError as exc:
        print(f"treadle: error: {exc}", file=sys.stderr)
        return 2
