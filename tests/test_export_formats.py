"""`treadle export` writes through any installed format, with options, and leaves nothing behind
when the writer fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import toy

import treadle
from treadle import checkpoint, cli
from treadle.plugins.export import export

FORMAT = """
import json
from pathlib import Path
from treadle.plugins.checkpoint.safetensors_format import SafetensorsFormat

class Tagged(SafetensorsFormat):
    name = "tagged"

    def __init__(self, tag: str = "none", fail: bool = False) -> None:
        super().__init__()
        self.tag, self.fail = tag, fail

    def export_model(self, source, directory, state):
        if self.fail:
            raise RuntimeError("disk full")
        files = super().export_model(source, directory, state)
        (Path(directory) / "tag.json").write_text(json.dumps({"tag": self.tag, "from": source.name}))
        return files + ["tag.json"]
"""


@pytest.fixture
def trained(tmp_path: Path, fake_dist: Any) -> Path:
    fake_dist("tagged-format", {"treadle.checkpoint": {"tagged": "tagged_fmt:Tagged"}},
              modules={"tagged_fmt": FORMAT})  # fmt: skip
    run = treadle.Run(toy.model(), toy.train_data(), loggers=[],
                      config=treadle.Config(max_steps=2, output_dir=str(tmp_path / "run")))  # fmt: skip
    run.fit()
    return tmp_path / "run"


def test_a_format_with_options_writes_the_export_from_the_command_line(
    trained: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code = cli.main(["export", str(trained), str(out), "--format", "tagged", "--option", "tag='x'"])
    assert code == 0
    assert (out / "tag.json").read_text() == '{"tag": "x", "from": "step-000002"}'
    assert checkpoint.verify(out) == []  # the format's own file is in the manifest
    model = toy.model()
    treadle.load_weights(model, out)


def test_unknown_format_options_are_refused_by_name(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(
        treadle.ConfigError, match=r"checkpoint format 'tagged': invalid options \['colour'\]"
    ):
        export(trained, tmp_path / "out", format={"name": "tagged", "colour": 1})


def test_a_failing_writer_leaves_no_folder_behind(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="disk full"):
        export(trained, tmp_path / "out", format={"name": "tagged", "fail": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "site"]
