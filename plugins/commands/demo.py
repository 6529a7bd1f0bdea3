"""``treadle demo [options]`` (the demo itself is ``treadle.plugins.demo``)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(arguments: Sequence[str]) -> int:
    """train a small transformer on a generated task"""
    from treadle.plugins import demo

    return int(demo.main(list(arguments)))
