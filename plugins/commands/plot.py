"""``treadle plot RUN_DIR [RUN_DIR ...] [-o OUT]`` (the drawing is ``treadle.plugins.plot``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]


def main(arguments: Sequence[str]) -> int:
    """draw runs' loss, learning rate, eval metrics and throughput as one PNG"""
    from treadle.plugins import plot

    parser = argparse.ArgumentParser(
        prog="treadle plot",
        description="Draw runs' loss, learning rate, eval metrics and throughput as one PNG.",
    )
    parser.add_argument(
        "run_dir", nargs="+", help="a run's output directory, or its metrics.jsonl; several compare"
    )
    parser.add_argument(
        "-o",
        "--out",
        default=None,
        help="the PNG to write (default: RUN_DIR/metrics.png; ./comparison.png for several runs)",
    )
    args = parser.parse_args(list(arguments))
    print(plot.plot_runs(args.run_dir, args.out))
    return 0
