"""The docs site: generated reference pages match the code, and every code block of docs/ runs.

Blocks of a page run in order, in one process, in a temporary folder (like a notebook), after
``import torch, treadle`` (the set-up every example assumes):
- ```python blocks run, unless their first line is ``# not run: <reason>`` (reason required);
  one whose first line is ``# file: NAME`` is written to NAME instead;
- ```toml blocks whose first line is ``# file: NAME`` are written to NAME; others are fragments;
- ```bash lines that start ``treadle run|launch|plot|export|plugins`` run; other lines do not.
A page importing a module that is not installed is skipped (naming it), unless
``TREADLE_DOCS_REQUIRE_ALL=1`` (``nox -s docs``), where it fails.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", flags=re.S | re.M)
_RUNNABLE_COMMANDS = {"run", "launch", "plot", "export", "plugins"}


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_reference", DOCS / "_hooks" / "gen_reference.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_reference"] = module
    spec.loader.exec_module(module)
    return module


gen = _generator()


# ------------------------------------------------------------------ generated reference


def test_hook_reference_documents_every_hook_and_only_hooks() -> None:
    import treadle.hookspecs as hookspecs

    page = gen.hook_reference()
    documented = set(re.findall(r"^## `(\w+)`$", page, flags=re.M))
    specs = {name for name, value in vars(hookspecs).items() if hasattr(value, "treadle_spec")}
    assert specs, "no hook specifications found"
    assert documented == specs, (sorted(specs - documented), sorted(documented - specs))
    for name in specs:  # each section states its kind, its arguments and both equivalents
        section = page.split(f"## `{name}`")[1].split("\n## ")[0]
        kind = "Provider" if hookspecs.__dict__[name].treadle_spec.get("firstresult") else "Event"
        assert f"**{kind}**" in section, name
        assert "| `run` |" in section, name
        assert "HF `Trainer`:" in section and "Lightning:" in section, name
    assert "HF `Trainer`: ``on_train_begin``" in page.split("## `on_fit_begin`")[1]


def test_a_hook_without_a_docstring_fails_the_build(tmp_path: Path) -> None:
    source = tmp_path / "fake_hookspecs.py"
    source.write_text(
        "import pluggy\nspec = pluggy.HookspecMarker('treadle')\n"
        "@spec\ndef on_documented(run):\n    'Fires. (HF: ``x``.)'\n"
        "@spec\ndef on_silent(run):\n    pass\n"
    )
    spec = importlib.util.spec_from_file_location("fake_hookspecs", source)
    assert spec and spec.loader
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    table = {"on_documented": None, "on_silent": None}
    with pytest.raises(gen.DocsError, match="on_silent"):
        gen.hook_reference(fake, lightning=table)
    fake.on_silent.__doc__ = "Fires too."
    assert "## `on_silent`" in gen.hook_reference(fake, lightning=table)


def test_the_lightning_table_must_name_every_hook_exactly() -> None:
    table = dict(gen.LIGHTNING)
    table.pop("on_step_end")
    with pytest.raises(gen.DocsError, match="on_step_end"):
        gen.hook_reference(lightning=table)
    with pytest.raises(gen.DocsError, match="on_no_such_hook"):
        gen.hook_reference(lightning={**gen.LIGHTNING, "on_no_such_hook": None})


def test_loop_pseudocode_is_hookspecs_docstring() -> None:
    import treadle.hookspecs as hookspecs

    loop = gen.loop_pseudocode()
    assert "run.fit():" in loop and "# <on_step_end>" in loop
    for line in loop.splitlines()[1:-1]:
        assert line.strip() in hookspecs.__doc__, line


def test_component_reference_lists_every_entry_point_with_its_options() -> None:
    import importlib.metadata as md

    page = gen.component_reference()
    for point in md.distribution("treadle").entry_points:
        if point.group.startswith("treadle."):
            kind = point.group.removeprefix("treadle.")
            assert f"### {point.name} {{#{kind}-" in page, (kind, point.name)
    early = page.split("### early-stopping ")[1].split("\n### ")[0]
    assert "| `patience` | `int` | `3` | evaluations without improvement" in early


def test_an_undocumented_option_fails_the_build() -> None:
    class Quiet:
        """A plugin.

        Args:
            loud: documented.
        """

        def __init__(self, loud: bool = False, secret: int = 1) -> None: ...

    with pytest.raises(gen.DocsError, match="secret"):
        gen.options_of(Quiet)


def test_config_reference_has_every_field() -> None:
    import attrs

    import treadle

    page = gen.config_reference()
    for field in attrs.fields(treadle.Config):
        row = next(line for line in page.splitlines() if line.startswith(f"| `{field.name}` |"))
        assert repr(field.default) in row, row
    assert "micro-batches per optimizer step" in page


def test_run_file_schema_has_every_accepted_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from treadle.plugins.commands import runfile

    page = gen.run_file_schema()
    for key in runfile.RUN_KEYS:
        assert f"| `{key}` |" in page, key
    monkeypatch.setattr(runfile, "RUN_KEYS", {*runfile.RUN_KEYS, "callbacks"})
    with pytest.raises(gen.DocsError, match="callbacks"):
        gen.run_file_schema()


def test_plugin_directory_lists_first_party_and_contrib() -> None:
    first = gen.first_party_plugins()
    assert "[`early-stopping`](reference/components.md#plugin-early-stopping)" in first
    contrib = gen.contrib_plugins()
    for project in sorted((ROOT / "contrib").glob("*/pyproject.toml")):
        assert f"### {project.parent.name} " in contrib
    assert "| plugin | `lora` | `treadle_hf.lora:LoRA` |" in contrib
    expanded = gen.expand_markers((DOCS / "plugins.md").read_text())
    assert "<!-- generated" not in expanded and "treadle-optuna" in expanded


def test_links_outside_docs_point_at_the_repository() -> None:
    text = "see [x](../core/hookspecs.py) and [y](../../contrib/a/README.md#b) and [z](hooks.md)"
    assert gen.link_outside_docs(text, "hooks.md") == (
        f"see [x]({gen.SOURCE_URL}/core/hookspecs.py) and [y](../../contrib/a/README.md#b) "
        "and [z](hooks.md)"
    )
    assert f"]({gen.SOURCE_URL}/contrib/a/README.md#b)" in gen.link_outside_docs(
        text, "tutorials/x.md"
    )


def test_generated_pages_are_not_committed() -> None:
    for path in gen.GENERATED_PAGES:
        assert not (DOCS / path).exists(), f"docs/{path} is generated at build time"


# ------------------------------------------------------------------ every code block runs


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)


def _page_script(text: str) -> tuple[str, set[str]]:
    """A script running the page's blocks in order, and the top-level modules they import."""
    steps: list[str] = ["import subprocess, sys", "import torch, treadle"]
    modules: set[str] = set()
    for language, body in _FENCE.findall(text):
        first = body.splitlines()[0].strip() if body.strip() else ""
        if first.startswith("# not run"):
            assert re.match(r"# not run: \S", first), f"a '# not run' block needs a reason: {first}"
            continue
        if first.startswith("# file:") and language in ("python", "toml"):
            name = first.removeprefix("# file:").strip()
            steps.append(f"open({name!r}, 'w').write({body!r})")
            continue
        if language == "python":
            tree = ast.parse(body)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    modules.add(node.module.split(".")[0])
            steps.append(f"exec(compile({body!r}, 'block', 'exec'), globals())")
        elif language == "bash":
            for line in body.splitlines():
                if not line.startswith("treadle "):
                    continue  # only treadle's own commands are known to be safe here
                words = shlex.split(line, comments=True)
                if words[:1] == ["treadle"] and words[1:2] and words[1] in _RUNNABLE_COMMANDS:
                    steps.append(
                        f"subprocess.run([sys.executable, '-m', 'treadle', *{words[1:]!r}], "
                        "check=True)"
                    )
    return "\n".join(steps) + "\n", modules


@pytest.mark.timeout(600)
@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.relative_to(DOCS).as_posix())
def test_every_code_block_runs(page: Path, tmp_path: Path) -> None:
    script, modules = _page_script(page.read_text(encoding="utf-8"))
    if "exec(" not in script and "subprocess.run([" not in script:
        return  # nothing runnable (prose, fragments marked # not run)
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    if missing:
        if os.environ.get("TREADLE_DOCS_REQUIRE_ALL"):
            pytest.fail(f"{page.name} imports {missing}, not installed")
        pytest.skip(f"{page.name} needs {missing}")
    (tmp_path / "page.py").write_text(script)
    env: dict[str, Any] = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "page.py"], cwd=tmp_path, capture_output=True, text=True, env=env,
        timeout=540,
    )  # fmt: skip
    assert result.returncode == 0, f"{page.name}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
