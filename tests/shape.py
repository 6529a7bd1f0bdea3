"""``python -m tests.shape`` (``nox -s shape``): the kernel's size and shape, against its budget.

Prints the code lines of every module in ``core/`` (lines holding code: no docstring, comment or
blank line) and exits non-zero when any of these is broken:

- ``core/`` without the conformance kit (``core/testing/``) holds at most ``BUDGET`` code lines;
- ``treadle.loop.fit`` fits on one screen: at most ``FIT_LINES`` lines, ``def`` to last line;
- no function in ``core/`` nests blocks deeper than ``DEPTH``: a function's body is depth 1, the
  body of a ``for``/``if``/``with``/``try``/``while`` in it depth 2, and so on (a function
  defined inside another is measured on its own);
- no module but ``core/run.py`` reads or writes a private attribute of a ``Run``: an attribute
  starting with ``_`` of a name ``run`` or of an attribute ``.run`` (``run._x``, ``self.run._x``),
  anywhere in ``core/``, ``plugins/`` and the contrib distributions' sources.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL = ROOT / "core"
KIT = KERNEL / "testing"
BUDGET = 2_200
FIT_LINES = 60
DEPTH = 4

_NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
             tokenize.ENDMARKER}  # fmt: skip
_BLOCKS = (ast.For, ast.AsyncFor, ast.While, ast.If, ast.With, ast.AsyncWith, ast.Try,
           ast.TryStar, ast.Match)  # fmt: skip
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def code_lines(source: str) -> int:
    """Lines that hold a token of code: not blank, not only a comment, not a docstring."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, *_FUNCTIONS)) and node.body:
            first = node.body[0]
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(first.lineno, (first.end_lineno or 0) + 1))
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in _NOT_CODE:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstrings)


def kernel_modules() -> Iterator[Path]:
    yield from sorted(p for p in KERNEL.rglob("*.py") if "__pycache__" not in p.parts)


def _depth(statements: list[ast.stmt], level: int) -> int:
    """The deepest block level among ``statements`` (at ``level``), not entering functions."""
    deepest = level if statements else level - 1
    for statement in statements:
        if isinstance(statement, (*_FUNCTIONS, ast.ClassDef)):
            continue
        if isinstance(statement, ast.If) and [type(s) for s in statement.orelse] == [ast.If]:
            # an ``elif``: written at the level of its ``if``, not inside it
            deepest = max(deepest, _depth(statement.body, level + 1))
            deepest = max(deepest, _depth(statement.orelse, level))
            continue
        for field in ("body", "orelse", "finalbody"):
            inner = getattr(statement, field, None)
            if isinstance(statement, _BLOCKS) and isinstance(inner, list) and inner:
                deepest = max(deepest, _depth(inner, level + 1))
        for handler in getattr(statement, "handlers", ()):
            deepest = max(deepest, _depth(handler.body, level + 1))
        for case in getattr(statement, "cases", ()):
            deepest = max(deepest, _depth(case.body, level + 1))
    return deepest


def too_deep(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, _FUNCTIONS):
            depth = _depth(node.body, 1)
            if depth > DEPTH:
                found.append(f"{_shown(path)}:{node.lineno} {node.name}: depth {depth}")
    return found


def fit_length() -> int:
    tree = ast.parse((KERNEL / "loop.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "fit":
            return (node.end_lineno or node.lineno) - node.lineno + 1
    raise SystemExit("core/loop.py has no function fit")


def _is_run(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "run") or (
        isinstance(node, ast.Attribute) and node.attr == "run"
    )


def private_run_access() -> list[str]:
    """``run._x`` outside core/run.py, in the kernel, the plugins and contrib sources."""
    sources = [*KERNEL.rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]
    sources += (ROOT / "contrib").glob("*/src/**/*.py")
    found = []
    for path in sorted(sources):
        if path != KERNEL / "run.py" and "__pycache__" not in path.parts:
            found += private_run_access_in(path)
    return found


def private_run_access_in(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        name = _attribute_of_run(node)
        if name is not None and name.startswith("_") and not name.startswith("__"):
            found.append(f"{_shown(path)}:{node.lineno} run.{name}")  # type: ignore[attr-defined]
    return found


def _attribute_of_run(node: ast.AST) -> str | None:
    """``x`` of ``run.x``, or of ``getattr(run, "x", ...)`` / ``setattr`` / ``hasattr``."""
    if isinstance(node, ast.Attribute) and _is_run(node.value):
        return node.attr
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
        and len(node.args) >= 2
        and _is_run(node.args[0])
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    ):
        return node.args[1].value
    return None


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if ROOT in path.parents else str(path)


def main() -> int:
    total = 0
    print(f"{'code lines':>10}  module")
    for path in kernel_modules():
        count = code_lines(path.read_text())
        in_budget = KIT not in path.parents
        total += count if in_budget else 0
        print(f"{count:>10}  {path.relative_to(ROOT)}{'' if in_budget else '  (kit)'}")
    failures = []
    print(f"{total:>10}  core/ without core/testing/ (budget {BUDGET})")
    if total > BUDGET:
        failures.append(f"core/ holds {total} code lines, over the budget of {BUDGET}")
    length = fit_length()
    print(f"{length:>10}  lines of treadle.loop.fit (at most {FIT_LINES})")
    if length > FIT_LINES:
        failures.append(f"treadle.loop.fit is {length} lines long, over {FIT_LINES}")
    deep = [line for path in kernel_modules() for line in too_deep(path)]
    print(f"{len(deep):>10}  functions in core/ nested deeper than {DEPTH}")
    failures += [f"nested deeper than {DEPTH}: {line}" for line in deep]
    private = private_run_access()
    print(f"{len(private):>10}  reads or writes of a Run's private attribute outside core/run.py")
    failures += [f"a Run's private attribute outside core/run.py: {line}" for line in private]
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
