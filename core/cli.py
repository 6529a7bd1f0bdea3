"""The ``treadle`` command: ``treadle NAME ARGS...`` calls the ``treadle.command`` entry point
NAME with ARGS and exits with the code it returns.

Every command is such an entry point: treadle's own (``run``, ``launch``, ``plugins``,
``export``, ``plot``, ``demo``, ``new-plugin``) are declared in its pyproject.toml exactly as a
third party declares one, so this dispatcher names none of them. ``treadle --help`` lists the
installed commands, each with the first paragraph of its docstring.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import textwrap
from collections.abc import Sequence

from treadle import __version__, registry
from treadle.errors import TreadleError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``treadle ARGS...`` (``sys.argv`` by default) and return the exit code; a
    ``TreadleError`` is printed as ``treadle: error: ...`` and gives 2."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0].startswith("-"):
        parser = argparse.ArgumentParser(
            prog="treadle",
            usage="treadle [-h] [--version] COMMAND [ARGS ...]",
            description="A microkernel for training PyTorch models.",
            epilog=_listing() if arguments[:1] in ([], ["-h"], ["--help"]) else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument("--version", action="version", version=f"treadle {__version__}")
        parser.parse_args(arguments)  # --help and --version exit with 0, anything else with 2
        parser.print_help()
        return 2
    try:  # an unknown name: registry.UnknownNameError, naming the closest installed command
        return int(registry.load("command", arguments[0])(arguments[1:]) or 0)
    except TreadleError as exc:
        print(f"treadle: error: {exc}", file=sys.stderr)
        return 2


def _listing() -> str:
    """One row per installed command: the first paragraph of its docstring, and the package
    that installed it unless that is treadle (this imports every command; only help does)."""
    commands = registry.entries("command")
    width = max((len(name) for name in commands), default=0)
    rows = []
    for name, declared in sorted(commands.items()):
        try:
            about = (inspect.getdoc(registry.load("command", name)) or "").split("\n\n")[0]
        except TreadleError as exc:
            about = f"cannot be loaded ({type(exc).__name__}; `treadle {name}` says why)"
        others = [e for e in declared if e.distribution != registry.FIRST_PARTY]
        source = ", ".join(f"{e.distribution} {e.version}" for e in others)
        about = " ".join([*about.split(), *([f"(installed by {source})"] if source else [])])
        indent = f"  {name:<{width}}  "
        rows.append(textwrap.fill(about, 96, initial_indent=indent, break_on_hyphens=False,
                                  subsequent_indent=" " * len(indent)))  # fmt: skip
    return "commands (`treadle COMMAND --help` describes each):\n" + "\n".join(rows)
