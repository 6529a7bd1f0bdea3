"""Property-based: any Config, mapping or run file ends in success or a TreadleError, quickly,
without touching anything outside its temporary directory.

Fixed budget (``derandomize=True``: the same examples on every run, so CI is reproducible);
the strategies below are the generators, kept here with the tests that use them.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import treadle
from treadle.cli import main
from treadle.errors import TreadleError
from treadle.plugins.commands.runfile import build_run

BUDGET = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,  # nothing written to the working directory
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FIELDS = [field.name for field in attrs.fields(treadle.Config)]

# ------------------------------------------------------------------ strategies

#: scalar values of every TOML type (dates aside) and a few Python-only ones
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, 2, 3, -1, 2**32 - 1, 2**32]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "min", "max", "mean", "tokens", "", "\0", "eval/loss", "loss"]),
)
toml_scalars = scalars.filter(lambda v: v is not None)
keys = st.one_of(st.sampled_from(FIELDS), st.text(min_size=1, max_size=10))


def nested(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Values of random types, including arrays and (inline) tables of them."""
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3)
        ),
        max_leaves=6,
    )


config_values = st.dictionaries(keys, nested(scalars), max_size=5)
toml_config_values = st.dictionaries(keys, nested(toml_scalars), max_size=5)

#: factories of the toy fixture module, with options right, wrong or of the wrong type
factory_names = st.sampled_from(
    ["toy:model", "toy:train_data", "toy:dataset", "toy:samples", "toy:Pairs", "toy:nothing",
     "toy", "nosuchmodule:x", ":x", "toy:model.extra"]
)  # fmt: skip
factory_specs = st.one_of(
    factory_names,
    st.builds(
        lambda name, options: {"factory": name, **options},
        factory_names,
        st.dictionaries(
            st.sampled_from(["width", "dropout", "n", "batch_size", "seed", "zzz"]),
            nested(toml_scalars),
            max_size=2,
        ),
    ),
    nested(toml_scalars),
)
component_names = st.sampled_from(
    ["console", "jsonl", "csv", "early-stopping", "metrics", "grad-clip", "numeric-guard",
     "nosuch", "single", "fp32", "adamw", "sgd", "cosine", "safetensors", ""]
)  # fmt: skip
component_specs = st.one_of(
    component_names,
    st.builds(
        lambda name, options: {"name": name, **options},
        component_names,
        st.dictionaries(
            st.sampled_from(["lr", "monitor", "patience", "max_norm", "x"]),
            nested(toml_scalars),
            max_size=2,
        ),
    ),
    st.builds(lambda name: {"import": name}, factory_names),
    nested(toml_scalars),
)
lists_of_specs = component_specs | st.lists(component_specs, max_size=3)

run_keys = ["strategy", "precision", "optimizer", "scheduler", "checkpoint", "loss_fn"]
run_files = st.fixed_dictionaries(
    {
        "model": factory_specs,
        "train_data": factory_specs,
        "config": toml_config_values | nested(toml_scalars),
    },
    optional={
        "eval_data": factory_specs,
        "loggers": lists_of_specs,
        "plugins": lists_of_specs,
        **{key: component_specs for key in run_keys},
        "unknown_key": nested(toml_scalars),
    },
)

#: run files likely to train: right factories, a small valid config with a few random fields
trainable_files = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["toy:model", {"factory": "toy:model", "width": 4}]),
        "train_data": st.sampled_from(["toy:train_data", {"factory": "toy:train_data", "n": 16}]),
        "config": st.fixed_dictionaries(
            {"max_steps": st.integers(1, 2)},
            optional={
                "log_every": st.integers(0, 2),
                "eval_every": st.integers(1, 2),
                "save_every": st.integers(1, 2),
                "keep_last": st.integers(1, 2),
                "keep_best": st.integers(0, 1),
                "monitor": st.sampled_from(["loss", "eval/loss", "nothing"]),
                "grad_accum_steps": st.integers(1, 3),
                "resume": st.sampled_from(["auto", "missing-dir"]),
                "eval_every_epoch": st.booleans(),
                "seed": st.sampled_from([0, 7, 2**32]),
            },
        ),
    },
    optional={
        "eval_data": st.sampled_from(["toy:train_data", {"factory": "toy:train_data", "n": 0}]),
        "loggers": lists_of_specs,
        "plugins": lists_of_specs,
        "optimizer": component_specs,
        "scheduler": component_specs,
    },
)


def toml(value: Any) -> str:
    """A TOML inline value (the reader is tomllib; the writer is this, to need no package)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_string(k)} = {toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def _string(text: str) -> str:
    """A TOML basic string: control characters, quote and backslash escaped."""
    escaped = "".join(
        f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F or c in '"\\' else c for c in text
    )
    return f'"{escaped}"'


def toml_file(spec: dict[str, Any]) -> str:
    return "".join(f"{_string(key)} = {toml(value)}\n" for key, value in spec.items())


# ------------------------------------------------------------------ the sandbox


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")
            if p.is_file()}  # fmt: skip


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Work in tmp_path/work; a sibling directory must come out unchanged."""
    work, sibling = tmp_path / "work", tmp_path / "sibling"
    work.mkdir()
    sibling.mkdir()
    (sibling / "keep.txt").write_text("untouched")
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fixtures"))
    before = _snapshot(sibling)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warnings are allowed; exceptions are what is checked
        yield work
    assert _snapshot(sibling) == before
    assert sorted(os.listdir(tmp_path)) == ["sibling", "work"]


def _fresh(work: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=work))


# ------------------------------------------------------------------ properties


@pytest.mark.timeout(120)
@BUDGET
@given(values=config_values)
def test_config_keywords_build_or_raise_a_treadle_error(values: dict[str, Any]) -> None:
    with contextlib.suppress(TreadleError):
        treadle.Config(**values)


@pytest.mark.timeout(120)
@BUDGET
@given(values=st.one_of(config_values, nested(scalars)))
def test_config_from_dict_builds_or_raises_a_treadle_error(values: Any) -> None:
    with contextlib.suppress(TreadleError):
        treadle.Config.from_dict(values)


@pytest.mark.timeout(120)
@BUDGET
@given(values=config_values, start=st.sampled_from([{}, {"max_steps": 3, "keep_best": 1,
                                                         "monitor": "loss"}]))  # fmt: skip
def test_config_replace_builds_or_raises_a_treadle_error(
    values: dict[str, Any], start: dict[str, Any]
) -> None:
    with contextlib.suppress(TreadleError):
        treadle.Config(**start).replace(**values)


@pytest.mark.timeout(120)
@BUDGET
@given(spec=run_files)
def test_build_run_on_any_run_file_builds_or_raises_a_treadle_error(
    sandbox: Path, spec: dict[str, Any]
) -> None:
    directory = _fresh(sandbox)
    if isinstance(spec.get("config"), dict):
        spec["config"].setdefault("output_dir", str(directory / "out"))
    path = directory / "run.toml"
    path.write_text(toml_file(spec))
    try:
        with build_run(path):
            pass
    except TreadleError:
        pass


@pytest.mark.timeout(180)
@settings(BUDGET, max_examples=40)
@given(spec=trainable_files)
def test_treadle_run_trains_or_reports_a_treadle_error(
    sandbox: Path, spec: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _fresh(sandbox)
    spec["config"]["output_dir"] = str(directory / "out")
    path = directory / "run.toml"
    path.write_text(toml_file(spec))
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2:
        assert "treadle: error: " in err


def test_the_toml_writer_round_trips() -> None:
    import tomllib

    value = {"a": [1, 2.5, "x\0y\x7f", True], "b": {"c": float("inf"), "d": 'é\n"\\😀'}}
    assert tomllib.loads(toml_file(value)) == value
