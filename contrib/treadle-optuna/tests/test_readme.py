"""The README's examples are the ones that work: its run file and space are a valid search, and
its Python example prints what its comment says."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from treadle_optuna import parse_space

README = (Path(__file__).parents[1] / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_readme_space_parses() -> None:
    run_file, space = (tomllib.loads(block) for block in _blocks("toml"))
    assert {"model", "train_data", "eval_data"} <= set(run_file)
    assert [param.name for param in parse_space(space)] == ["optimizer.lr"]


@pytest.mark.timeout(120)
def test_the_readme_python_example_prints_its_comment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _blocks("python")[1]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    expected = re.search(r"# (\{'optimizer.lr': [\d.]+)\.\.\.\} ([\d.]+)\.\.\.", example)
    assert expected is not None
    assert printed.startswith(expected[1]), printed
    assert printed.split("} ")[1].startswith(expected[2]), printed
    assert (tmp_path / "runs" / "lr-search" / "best.json").is_file()
