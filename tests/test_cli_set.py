"""``treadle run FILE --set KEY=VALUE``: any value of a run file, by its dotted path; and the
help texts that describe the run file and ``treadle launch``."""

from __future__ import annotations

from pathlib import Path

import pytest

from treadle.cli import main
from treadle.errors import ConfigError
from treadle.plugins.commands.runfile import apply_overrides, build_run

FILE = """
model = "toy:model"
train_data = "toy:train_data"
optimizer = "adamw"
[config]
max_steps = 3
[strategy]
name = "single"
device = "cpu"
[[plugins]]
name = "early-stopping"
monitor = "loss"
patience = 2
"""


def test_dotted_keys_reach_every_table() -> None:
    import tomllib

    spec = tomllib.loads(FILE)
    result = apply_overrides(
        spec,
        {
            "max_steps": 5,  # a Config field, by its name alone
            "config.log_every": 2,
            "optimizer.lr": 1e-3,  # a name alone becomes a table
            "strategy.name": "ddp",
            "plugins.early-stopping.patience": 7,
            "plugins.ema.decay": 0.9,  # an entry the file did not have
            "loggers": ["jsonl"],
            "model": "toy:other",
        },
    )
    assert result["config"] == {"max_steps": 5, "log_every": 2}
    assert result["optimizer"] == {"name": "adamw", "lr": 1e-3}
    assert result["strategy"] == {"name": "ddp", "device": "cpu"}
    assert result["plugins"] == [
        {"name": "early-stopping", "monitor": "loss", "patience": 7},
        {"name": "ema", "decay": 0.9},
    ]
    assert result["loggers"] == ["jsonl"] and result["model"] == "toy:other"
    assert spec == tomllib.loads(FILE)  # the file's own table is left alone


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("max_stepz", "'max_stepz' is neither a Config field nor a key of a run file"),
        ("plugins.early-stopping", "name an option of the plugins entry 'early-stopping'"),
        ("model.x", "model is 'toy:model', not a table"),
    ],
)
def test_bad_keys_are_named(key: str, message: str) -> None:
    import tomllib

    with pytest.raises(ConfigError, match=message):
        apply_overrides(tomllib.loads(FILE), {key: 1})


def test_the_command_line_applies_them(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(FILE)
    run = build_run(path, {"optimizer.lr": 0.5, "output_dir": str(tmp_path / "out")})
    assert run.optimizer_spec[1] == {"lr": 0.5}  # (factory, options)
    assert run.config.output_dir == str(tmp_path / "out")
    settings = [f"output_dir={tmp_path / 'cli'}", "max_steps=2", "optimizer.lr=0.25"]
    code = main(["run", str(path), *(a for s in settings for a in ("--set", s))])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "cli" / "checkpoints").glob("step-*")) == [
        "step-000002"
    ]


def test_an_unknown_option_set_on_a_component_names_the_file_and_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.toml"
    path.write_text(FILE)
    assert main(["run", str(path), "--set", "strategy.devize=cpu"]) == 2
    error = capsys.readouterr().err
    assert str(path) in error and "devize" in error


def test_run_help_describes_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for expected in ("model = ", "train_data = ", "[config]", "save_async", "[[plugins]]"):
        assert expected in text
    assert "--set optimizer.lr=1e-3" in text


def test_launch_help_puts_treadles_options_first(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["launch", "--help"])
    text = capsys.readouterr().out
    assert text.index("--launcher NAME") < text.index("--nproc-per-node")
    assert "treadle's own options" in text
