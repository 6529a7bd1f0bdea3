"""``treadle run RUN.toml [--set KEY=VALUE ...]``: train the run a TOML file describes."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from treadle.plugins.commands.runfile import build_run, parse_key_values, run_file_help

__all__ = ["main"]


def main(arguments: Sequence[str]) -> int:
    """train the run described by a TOML file"""
    parser = argparse.ArgumentParser(
        prog="treadle run",
        description=run_file_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", help="the run file (TOML)")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any value of the run file (repeatable; see above)",
    )
    args = parser.parse_args(list(arguments))
    overrides = parse_key_values("--set", args.set)
    with build_run(args.file, overrides) as run:
        run.fit()
    return 0
