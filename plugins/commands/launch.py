"""``treadle launch [--launcher NAME] [torchrun options] RUN.toml [run options]``: ``treadle run``
on several processes, started by torchrun (or by a strategy's own launcher)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from treadle import registry
from treadle.errors import ConfigError

__all__ = ["launch_argv", "main", "split_launcher"]

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
    ``--launcher deepspeed``): this command knows no launcher but torch's.
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


def main(arguments: Sequence[str]) -> int:
    """train RUN.toml on several processes through torchrun (or a strategy's own launcher:
    --launcher deepspeed)"""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    launcher, argv = split_launcher(arguments)
    if launcher != "torchrun":
        return _strategy_launch(launcher, argv)
    try:
        torchrun.main(launch_argv(argv))
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        print(f"treadle: error: {exc.get_first_failure()[1].message or exc}", file=sys.stderr)
        return next((code for code in codes if code > 0), 1)
    return 0
