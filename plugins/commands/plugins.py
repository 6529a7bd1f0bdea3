"""``treadle plugins [--json] [--verbose]``: every installed name, by kind, from the registry."""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Sequence
from typing import Any, NamedTuple

from treadle import hookspecs, registry
from treadle.errors import TreadleError

__all__ = ["main"]


def main(arguments: Sequence[str]) -> int:
    """list installed plugins by kind (imports none unless --verbose)"""
    parser = argparse.ArgumentParser(
        prog="treadle plugins",
        description="List installed plugins by kind (imports none unless --verbose).",
    )
    parser.add_argument(
        "--json", action="store_true", help="as JSON: kind, name, value, distribution, version"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also the hooks each implements and its options (imports each plugin)",
    )
    args = parser.parse_args(list(arguments))
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
    """What ``--verbose`` adds (this imports the entry point): hooks implemented, options (a
    command's are its own ``--help``)."""
    try:
        target = registry.load(entry.kind, entry.name)
    except TreadleError as exc:
        return {"error": str(exc)}
    hooks = sorted(
        name
        for name in dir(hookspecs)
        if hasattr(getattr(target, name, None), f"{hookspecs.PROJECT}_impl")
    )
    return {"hooks": hooks, "options": [] if entry.kind == "command" else _options(target)}


def _options(target: Any) -> list[str]:
    try:
        found = options(target)
    except (TypeError, ValueError):
        return []
    return [
        option.name
        + (f": {option.type}" if option.type and not option.name.startswith("**") else "")
        + (f" = {option.default}" if option.default is not None else "")
        for option in found
    ]


class Option(NamedTuple):
    """One option a component takes: what a ``{"name": ..., **options}`` table may hold."""

    name: str  #: ``**options`` for a catch-all of forwarded options
    type: str  #: the annotation as written, "" when there is none
    default: str | None  #: ``repr`` of the default; None when required (or a catch-all)


def options(target: Any) -> list[Option]:
    """The options of a component class or factory, from its signature, less what the kernel
    passes positionally (an optimizer factory's model, a scheduler factory's optimizer).

    Raises:
        TypeError, ValueError: ``target`` has no signature ``inspect`` can read.
    """
    import inspect

    found = []
    for parameter in inspect.signature(target).parameters.values():
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.VAR_POSITIONAL):
            continue
        catch_all = parameter.kind is parameter.VAR_KEYWORD
        annotation = parameter.annotation
        if annotation is parameter.empty:
            written = ""
        else:
            written = (
                annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
            )
        default = (
            None if catch_all or parameter.default is parameter.empty else repr(parameter.default)
        )
        found.append(
            Option(f"**{parameter.name}" if catch_all else parameter.name, written, default)
        )
    return found
