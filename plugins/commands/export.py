"""``treadle export CHECKPOINT OUT [--format NAME] [--option KEY=VALUE ...]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from treadle.plugins.commands.runfile import parse_key_values

__all__ = ["main"]


def main(arguments: Sequence[str]) -> int:
    """write a checkpoint's weights as a weights-only folder (any format)"""
    from treadle.checkpoint import resolve
    from treadle.plugins.export import export

    parser = argparse.ArgumentParser(
        prog="treadle export",
        description="Write a checkpoint's weights as a weights-only folder, in any installed "
        "checkpoint format.",
    )
    parser.add_argument(
        "checkpoint", help="a checkpoint directory, a checkpoints/ directory or a run's output"
    )
    parser.add_argument("out", help="the folder to create")
    parser.add_argument(
        "--format",
        default="safetensors",
        help="checkpoint format to write, any installed name (default: safetensors)",
    )
    parser.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the format, e.g. --format hf --option config=path/to/model (repeatable)",
    )
    args = parser.parse_args(list(arguments))
    options = parse_key_values("--option", args.option)
    fmt = {"name": args.format, **options} if options else args.format
    out = export(args.checkpoint, args.out, format=fmt)
    print(f"exported the weights of {resolve(args.checkpoint)} to {out}")
    return 0
