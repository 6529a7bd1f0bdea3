"""Property-based tests of the checkpoint reader: whatever is on disk, it never misbehaves.

A real run's output directory (checkpoints at steps 2 and 4, made once per module) is copied
for every example and damaged at random: bytes corrupted, truncated or replaced, JSON values
replaced by random JSON (at random depth, with the manifest regenerated or not), random
manifest entries (climbing, absolute, NUL, directory names), links and FIFOs planted in and
next to the checkpoints, random ``latest`` contents. Then ``verify``, ``find_resumable``,
``load_weights``, ``export`` and a ``Run`` resuming with ``resume="auto"`` must each succeed
or raise a ``TreadleError`` (warning only with ``TreadleWarning``), never hang, and never
touch the sentinel directory next to the run that planted links point at.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import toy
from ckpt_runs import make_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import treadle
from treadle import checkpoint
from treadle.errors import TreadleError, TreadleWarning
from treadle.plugins.checkpoint import directory
from treadle.plugins.checkpoint import files as checkpoint_files
from treadle.plugins.export import export

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,  # nothing written outside tmp_path, and no replay between runs
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ------------------------------------------------------------------ strategies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
hostile_names = st.sampled_from(
    ["..", "../..", "../../../outside/precious.txt", "/etc/hostname", "a\0b", "", ".", "sub",
     "sub//x", "model.safetensors", "state.json", "step-000004", "x\\..\\y"]
) | st.text(max_size=16)  # fmt: skip
latest_contents = st.binary(max_size=40) | st.sampled_from(
    [b"step-000004\n", b"../outside\n", b"step-999999\n", b"\xff\xfe", b"[1, 2]"]
)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _set_at(value: Any, draw: Callable[[Any], Any]) -> Any:
    """``value`` with one node, chosen at random depth, replaced by random JSON."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        return {**value, key: _set_at(value[key], draw)}
    if isinstance(value, list) and value and draw(st.booleans()):
        index = draw(st.integers(0, len(value) - 1))
        return [*value[:index], _set_at(value[index], draw), *value[index + 1 :]]
    return draw(json_values)


def mutate(step: Path, outside: Path, draw: Callable[[Any], Any]) -> None:
    """One random damage to the checkpoint ``step`` or to the folder of checkpoints."""
    root = step.parent
    # weighted towards what reaches deepest: JSON content under a manifest that agrees
    kind = draw(
        st.sampled_from(
            ["json", "json", "json", "bytes", "truncate", "manifest", "plant", "latest"]
        )
    )
    files = _files(step)
    if kind in ("bytes", "truncate"):
        file = draw(st.sampled_from(files))
        data = bytearray(file.read_bytes())
        cut = draw(st.integers(0, len(data)))
        if kind == "truncate":
            data = data[:cut]
        else:
            data[cut : cut + 8] = draw(st.binary(max_size=8))
        file.write_bytes(bytes(data))
    elif kind == "json":
        file = draw(st.sampled_from([f for f in files if f.suffix == ".json"]))
        try:
            value = json.loads(file.read_bytes())
        except ValueError:  # damaged by an earlier mutation
            value = None
        file.write_text(json.dumps(_set_at(value, draw)))
        if file.name != "manifest.json" and draw(st.integers(0, 3)):
            (step / "manifest.json").unlink()
            with contextlib.suppress(TreadleError):  # refused where a link or FIFO is planted
                checkpoint_files.write_manifest(
                    step
                )  # a consistent manifest for inconsistent content
    elif kind == "manifest":
        try:
            manifest = json.loads((step / "manifest.json").read_bytes())
            assert isinstance(manifest["files"], dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):  # or none: see "json"
            manifest = {"files": {}}
        entry = draw(st.fixed_dictionaries({"size": json_values, "sha256": json_values}))
        manifest["files"][draw(hostile_names)] = entry
        (step / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "plant":
        where = draw(st.sampled_from([step, root, step / "model.safetensors"]))
        folder = where if where.is_dir() else where.parent
        name = where.name if not where.is_dir() else draw(
            st.sampled_from(["manifest.json", "state.json", "rng-rank00000.json", "step-000006",
                             ".step-000004.tmp", ".step-000006.old", ".latest.tmp", "extra"])
        )  # fmt: skip
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif os.path.lexists(target):
            target.unlink()
        if draw(st.booleans()):
            os.mkfifo(target)
        else:
            target.symlink_to(draw(st.sampled_from([outside, outside / "precious.txt"])))
    else:
        (root / "latest").write_bytes(draw(latest_contents))


# ------------------------------------------------------------------ fixtures and checks


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("property") / "run"
    make_run(out, save_every=2, max_steps=4)[0].fit()
    return out


_counter = itertools.count()


def example_dirs(original: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A fresh copy of the run and a sentinel directory next to it, for one example."""
    base = tmp_path / f"example-{next(_counter)}"
    out, outside = base / "run", base / "outside"
    shutil.copytree(original, out, symlinks=True)
    (outside / "inner").mkdir(parents=True)
    (outside / "precious.txt").write_bytes(b"do not touch\n")
    (outside / "inner" / "model.safetensors").write_bytes(b"not yours\n")
    return out, outside


def damaged(original: Path, tmp_path: Path, data: st.DataObject) -> tuple[Path, Path, Path]:
    """A copy of the run with one to three random damages to one of its checkpoints."""
    out, outside = example_dirs(original, tmp_path)
    step = out / "checkpoints" / data.draw(st.sampled_from(["step-000004", "step-000002"]))
    for _ in range(data.draw(st.integers(1, 3))):
        mutate(step, outside, data.draw)
    return out, outside, step


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def behaves(call: Callable[[], Any]) -> None:
    """``call`` succeeds or raises a TreadleError; any warning it gives is a TreadleWarning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.suppress(TreadleError):
            call()
    foreign = [w for w in caught if not issubclass(w.category, TreadleWarning)]
    assert not foreign, [str(w.message) for w in foreign]


# ------------------------------------------------------------------ properties


@pytest.mark.timeout(60, method="thread")  # hypothesis would retry a hang
@SETTINGS
@given(data=st.data())
def test_readers_fail_only_with_treadle_errors(
    original: Path, tmp_path: Path, data: st.DataObject
) -> None:
    out, outside, step = damaged(original, tmp_path, data)
    before = snapshot(outside)
    root = out / "checkpoints"
    assert isinstance(checkpoint.verify(step), list)
    behaves(lambda: directory.find_resumable(root))
    for source in (out, step):
        behaves(lambda s=source: treadle.load_weights(toy.model(width=8, dropout=0.2), s))
        behaves(lambda s=source: export(s, out.parent / f"export-{s.name}"))
    behaves(lambda: treadle.load_weights(toy.model(width=8, dropout=0.2), step, check=False))
    assert snapshot(outside) == before


@pytest.mark.timeout(60, method="thread")  # hypothesis would retry a hang
@settings(SETTINGS, max_examples=50)
@given(data=st.data())
def test_resume_fails_only_with_treadle_errors(
    original: Path, tmp_path: Path, data: st.DataObject
) -> None:
    out, outside, step = damaged(original, tmp_path, data)
    before = snapshot(outside)
    resume = data.draw(st.sampled_from(["auto", str(step)]))
    run, _ = make_run(out, resume=resume, max_steps=4)
    behaves(run.fit)
    assert snapshot(outside) == before
