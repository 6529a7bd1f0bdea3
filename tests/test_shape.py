"""The kernel's shape (``tests/shape.py``, ``nox -s shape``): the checks that guard the loop's
readability, the line budget included, hold on every commit."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests import shape


def test_the_kernel_is_within_its_line_budget() -> None:
    lines = sum(
        shape.code_lines(p.read_text())
        for p in shape.kernel_modules()
        if shape.KIT not in p.parents
    )
    assert lines <= shape.BUDGET, (
        f"core/ holds {lines} code lines, over {shape.BUDGET}: python -m tests.shape"
    )


def test_no_module_but_run_py_touches_a_private_attribute_of_a_run() -> None:
    assert shape.private_run_access() == []


def test_fit_fits_on_one_screen() -> None:
    assert shape.fit_length() <= shape.FIT_LINES


def test_no_kernel_function_nests_deeper_than_the_limit() -> None:
    assert [line for path in shape.kernel_modules() for line in shape.too_deep(path)] == []


def test_the_checks_can_fail(tmp_path: Path) -> None:
    deep = tmp_path / "deep.py"
    deep.write_text(
        textwrap.dedent("""
        def f(xs):
            for x in xs:
                if x:
                    with open(x) as handle:
                        while handle:
                            pass
                elif x is None:
                    pass
    """)
    )
    assert shape.too_deep(deep) and "f: depth 5" in shape.too_deep(deep)[0]
    flat = tmp_path / "flat.py"
    flat.write_text("def g(x):\n    if x:\n        pass\n    elif x is None:\n        pass\n")
    assert shape.too_deep(flat) == []
    source = '"""doc"""\n\n# comment\nx = 1  # trailing\n\ndef h():\n    """doc\n    more"""\n    return x\n'
    assert shape.code_lines(source) == 3
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "def f(run, self):\n    run._x = self.run._y + run.x\n    return run.__class__\n"
    )
    assert [line.rsplit(" ", 1)[1] for line in shape.private_run_access_in(plugin)] == [
        "run._x",
        "run._y",
    ]
