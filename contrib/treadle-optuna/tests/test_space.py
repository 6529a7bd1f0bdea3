"""The declarative space: parsed from TOML, sampled, written into a run file; run files written
so that tomllib reads back the same table."""

from __future__ import annotations

import tomllib
from pathlib import Path

import optuna
import pytest
from treadle_optuna import apply, params, parse_space, runfile, suggest

import treadle

SPACE = """\
[optimizer.lr]
type = "float"
low = 1e-4
high = 1e-1
log = true

[config.grad_accum_steps]
type = "categorical"
choices = [1, 2, 4]

[plugins.early-stopping.patience]
type = "int"
low = 1
high = 5
"""


def test_a_toml_space_is_sampled_by_run_file_path(tmp_path: Path) -> None:
    (tmp_path / "space.toml").write_text(SPACE)
    space = parse_space(tmp_path / "space.toml")
    assert [(p.name, p.kind) for p in space] == [
        ("optimizer.lr", "float"),
        ("config.grad_accum_steps", "categorical"),
        ("plugins.early-stopping.patience", "int"),
    ]
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    values = suggest(trial, space)
    assert 1e-4 <= values["optimizer.lr"] <= 1e-1
    assert values["config.grad_accum_steps"] in (1, 2, 4)
    assert params(trial, "optimizer") == {"lr": values["optimizer.lr"]}
    assert params(trial, "plugins.early-stopping") == {
        "patience": values["plugins.early-stopping.patience"]
    }


def test_values_are_written_into_the_run_file_table() -> None:
    spec = {
        "model": "pkg:model",
        "optimizer": "sgd",
        "config": {"max_steps": 10},
        "plugins": ["throughput", {"name": "early-stopping", "monitor": "eval/loss"}],
    }
    values = {
        "optimizer.lr": 0.01,
        "config.grad_accum_steps": 2,
        "plugins.early-stopping.patience": 3,
        "model.hidden": 64,
        "scheduler.warmup_steps": 5,
    }
    written = apply(spec, values)
    assert written == {
        "model": {"factory": "pkg:model", "hidden": 64},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "config": {"max_steps": 10, "grad_accum_steps": 2},
        "plugins": [
            "throughput",
            {"name": "early-stopping", "monitor": "eval/loss", "patience": 3},
        ],
        "scheduler": {"warmup_steps": 5},
    }
    assert spec["optimizer"] == "sgd"  # the original is left alone
    with pytest.raises(treadle.ConfigError, match="no plugin named 'nope'"):
        apply(spec, {"plugins.nope.patience": 1})
    with pytest.raises(treadle.ConfigError, match="names no place"):
        apply(spec, {"lr": 0.1})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"optimizer": {"lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}}, "low > 0"),
        ({"optimizer": {"lr": {"type": "float", "low": 1.0, "high": 0.1}}}, "above high"),
        ({"optimizer": {"lr": {"type": "normal"}}}, "expected one of"),
        ({"optimizer": {"lr": {"type": "float", "low": 0.1, "hi": 1.0}}}, "unknown keys"),
        ({"optimizer": {"lr": 0.1}}, "is not a parameter"),
        ({"config": {"seed": {"type": "categorical", "choices": []}}}, "non-empty list"),
        ({}, "declares no parameter"),
    ],
)
def test_a_bad_space_is_refused_by_name(table, message) -> None:
    with pytest.raises(treadle.ConfigError, match=message):
        parse_space(table)


def test_run_files_read_back_as_written(tmp_path: Path) -> None:
    spec = {
        "model": "pkg.models:regressor",
        "train_data": {"factory": "pkg.data:batches", "size": 32},
        "loggers": ["console", "jsonl"],
        "config": {"max_steps": 100, "output_dir": 'runs/with "quotes"\\', "eval_at_end": True},
        "optimizer": {"name": "adamw", "lr": 3.0000000000000004e-3, "betas": [0.9, 0.95]},
        "plugins": [
            {"name": "early-stopping", "monitor": "eval/loss", "patience": 3},
            {"import": "pkg.plugins:Mine", "options": {"a": 1}},
        ],
        "strategy": {"name": "ddp", "odd key": float("inf")},
    }
    text = runfile.dumps(spec)
    assert tomllib.loads(text) == spec
    path = runfile.write(tmp_path / "deep" / "run.toml", spec, header="line one\nline two")
    assert path.read_text().startswith("# line one\n# line two\n")
    assert tomllib.loads(path.read_text()) == spec
