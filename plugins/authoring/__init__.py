"""``treadle new-plugin KIND NAME``: start a plugin package (the plugin author kit).

``KIND`` is one of callback, strategy, precision, optimizer, scheduler, logger, checkpoint;
``NAME`` (lowercase, digits, hyphens) is what users will write (``strategy="NAME"``). It writes
``treadle-NAME/``::

    pyproject.toml                  the entry point, the requirement on treadle, a test extra
    README.md                       install, use, test, publish
    src/treadle_NAME/__init__.py    the component: every method to implement, with its docstring
    tests/test_NAME.py              the component through treadle.testing's conformance suite
    .github/workflows/publish.yml   test, build and upload to PyPI on a GitHub release

The package works as written: ``pip install ./treadle-NAME && pytest treadle-NAME/tests``
passes, and ``treadle plugins`` lists the new name. A first-party subcommand, declared as any
package declares one (``treadle.command`` entry point ``new-plugin``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from treadle.plugins.authoring.scaffold import KINDS, create

__all__ = ["new_plugin"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treadle new-plugin",
        description="Write a new plugin package treadle-NAME/: its entry point, the component "
        "with every method to implement, a test through treadle's conformance suite, a README "
        "and a publish workflow.",
    )
    parser.add_argument("kind", metavar="KIND", help=f"one of: {', '.join(KINDS)}")
    parser.add_argument("name", metavar="NAME", help="the plugin's name, e.g. my-logger")
    parser.add_argument("--dir", default=".", help="where to create treadle-NAME/ (default: here)")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing treadle-NAME/ folder"
    )
    return parser


def new_plugin(arguments: Sequence[str]) -> int:
    """write a plugin package treadle-NAME/ to start from: entry point, component, test, README

    A bad kind, name or existing folder raises ``treadle.ConfigError`` (the ``treadle``
    command prints it and exits with 2).
    """
    args = _parser().parse_args(list(arguments))
    root = create(args.kind, args.name, Path(args.dir), force=args.force)
    article = "an" if args.kind[0] in "aeiou" else "a"
    print(f"created {root}/ ({article} {args.kind} plugin named {args.name!r}). Next:")
    print(f"  pip install -e '{root}[test]'  &&  pytest {root}/tests")
    return 0
