"""Hostile and damaged checkpoint directories: links, FIFOs, climbing names, failed renames,
leftovers of interrupted saves, and files whose content is wrong though their manifest agrees.

Every case ends in a ``CheckpointError`` (or a warning and a fall-back with ``resume="auto"``)
that names the file and the field; nothing outside the output directory is read or written.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import toy
from ckpt_runs import make_run

import treadle
from treadle import checkpoint
from treadle.errors import CheckpointError, TreadleError, TreadleWarning
from treadle.plugins.checkpoint import directory
from treadle.plugins.checkpoint import files as checkpoint_files
from treadle.plugins.export import export

STEP2, STEP4 = "step-000002", "step-000004"


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run's output directory with checkpoints at steps 2 and 4 (made once per module)."""
    out = tmp_path_factory.mktemp("original") / "run"
    make_run(out, save_every=2, max_steps=4)[0].fit()
    return out


@pytest.fixture
def out(original: Path, tmp_path: Path) -> Path:
    """A private copy of ``original`` under ``tmp_path / "run"``."""
    copy = tmp_path / "run"
    shutil.copytree(original, copy, symlinks=True)
    return copy


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the output directory that links point at; must stay unchanged."""
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "precious.txt").write_bytes(b"do not touch\n")
    return victim


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def regenerate_manifest(path: Path) -> None:
    """As an attacker (or a bug) would: a manifest that agrees with whatever is there."""
    (path / "manifest.json").unlink()
    checkpoint_files.write_manifest(path)


def fresh_run(out: Path, **kwargs: Any) -> tuple[treadle.Run, Any]:
    return make_run(out, max_steps=kwargs.pop("max_steps", 4), **kwargs)


# ------------------------------------------------------------------ 1. links, when writing


@pytest.mark.parametrize("target", ["file", "dir"])
@pytest.mark.parametrize("name", [".latest.tmp", ".step-000004.tmp", STEP4])
def test_a_planted_link_is_never_written_through(
    tmp_path: Path, outside: Path, name: str, target: str
) -> None:
    out = tmp_path / "fresh"
    root = out / "checkpoints"
    root.mkdir(parents=True)
    (root / name).symlink_to(outside / "precious.txt" if target == "file" else outside)
    before = snapshot(outside)
    run, _ = fresh_run(out, max_steps=4)
    run.fit()
    assert snapshot(outside) == before
    assert not (root / STEP4).is_symlink() and checkpoint.verify(root / STEP4) == []
    assert (root / "latest").read_text() == STEP4 + "\n"
    assert not (root / ".latest.tmp").is_symlink() and not (root / ".step-000004.tmp").exists()


def test_latest_that_is_a_link_is_replaced_not_written_through(
    tmp_path: Path, outside: Path
) -> None:
    root = tmp_path / "fresh" / "checkpoints"
    root.mkdir(parents=True)
    (root / "latest").symlink_to(outside / "precious.txt")
    before = snapshot(outside)
    fresh_run(tmp_path / "fresh", max_steps=4)[0].fit()
    assert snapshot(outside) == before
    assert not (root / "latest").is_symlink() and (root / "latest").read_text() == STEP4 + "\n"


def test_checkpoints_folder_that_is_a_link_is_refused(tmp_path: Path, outside: Path) -> None:
    out = tmp_path / "fresh"
    out.mkdir()
    (out / "checkpoints").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    for resume in (None, "auto"):
        run, _ = fresh_run(out, max_steps=4, resume=resume)
        with pytest.raises(CheckpointError, match=r"checkpoints is a symbolic link"):
            run.fit()
    assert snapshot(outside) == before


# ------------------------------------------------------------------ 1. links, when reading


def test_a_step_directory_that_is_a_link_is_skipped(out: Path, tmp_path: Path) -> None:
    root = out / "checkpoints"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root / STEP4, elsewhere / "step-000006")  # a whole, valid checkpoint
    (root / "step-000006").symlink_to(elsewhere / "step-000006")
    assert "symbolic link" in checkpoint.verify(root / "step-000006")[0]
    run, recorder = fresh_run(out, resume="auto", max_steps=6)
    with pytest.warns(TreadleWarning, match=r"step-000006.*symbolic link"):
        run.fit()
    assert recorder.started_at == 4


@pytest.mark.parametrize("name", ["model.safetensors", "state.json"])
def test_a_file_that_is_a_link_makes_the_checkpoint_damaged(
    out: Path, tmp_path: Path, name: str
) -> None:
    path = out / "checkpoints" / STEP4
    moved = tmp_path / name
    shutil.move(path / name, moved)  # same bytes, so the manifest would still agree
    (path / name).symlink_to(moved)
    assert any(name in p and "symbolic link" in p for p in checkpoint.verify(path))
    with pytest.raises(CheckpointError, match="symbolic link"):
        treadle.load_weights(toy.model(width=8, dropout=0.2), path)
    run, recorder = fresh_run(out, resume="auto")
    with pytest.warns(TreadleWarning, match=rf"{STEP4}.*{name}.*symbolic link"):
        run.fit()
    assert recorder.started_at == 2


# ------------------------------------------------------------------ 2. re-saving a step


def test_a_failed_rename_on_resave_keeps_the_old_checkpoint_visible(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = out / "checkpoints"
    real_replace = os.replace
    seen: dict[str, str] = {}

    def replace(src: Any, dst: Any) -> None:
        if Path(src).name == ".step-000004.tmp" and Path(dst).name == STEP4:
            seen["latest"] = (root / "latest").read_text().strip()
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    # resumed from step 2 into the same directory: step 4 is saved again
    run, _ = fresh_run(out, resume=str(root / STEP2))
    with pytest.raises(CheckpointError, match=r"No space left.*previous step-000004 is kept"):
        run.fit()
    monkeypatch.undo()
    assert seen["latest"] == STEP2  # while step 4 was away, latest named a whole checkpoint
    assert checkpoint.verify(root / STEP4) == []
    assert (root / "latest").read_text().strip() == STEP4
    treadle.load_weights(toy.model(width=8, dropout=0.2), root / "latest".replace("latest", STEP4))
    assert directory.find_resumable(root) == root / STEP4


def test_a_checkpoint_hidden_by_an_interrupted_resave_is_restored_at_resume(out: Path) -> None:
    root = out / "checkpoints"
    os.replace(root / STEP4, root / ".step-000004.old")  # killed between the two renames
    (root / ".step-000004.tmp").mkdir()  # the half-written new one
    (root / ".step-000006.tmp").mkdir()
    (root / ".step-000002.del").mkdir()
    run, recorder = fresh_run(out, resume="auto")
    with pytest.warns(TreadleWarning, match=r"step-000004 was hidden .* restored"):
        run.fit()
    assert recorder.started_at == 4
    assert sorted(p.name for p in root.iterdir()) == ["latest", STEP2, STEP4]


def test_a_damaged_old_copy_is_removed_not_restored(out: Path) -> None:
    root = out / "checkpoints"
    os.replace(root / STEP4, root / ".step-000004.old")
    (root / ".step-000004.old" / "model.safetensors").write_bytes(b"damaged")
    run, recorder = fresh_run(out, resume="auto")
    run.fit()
    assert recorder.started_at == 2 and not (root / ".step-000004.old").exists()


# ------------------------------------------------------------------ 3. names


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Every path opened through ``open`` or ``os.open`` while the test runs."""
    paths: list[Path] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | Path):
            paths.append(Path(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(path: Any, *args: Any, **kwargs: Any) -> int:
        paths.append(Path(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    yield paths


@pytest.mark.parametrize("kind", ["climbing", "absolute", "nul", "directory", "empty part"])
def test_manifest_names_are_checked_before_any_file_is_opened(
    out: Path, outside: Path, kind: str, opened: list[Path]
) -> None:
    path = out / "checkpoints" / STEP4
    (path / "sub").mkdir()
    name = {
        "climbing": "../../../outside/precious.txt",
        "absolute": str(outside / "precious.txt"),
        "nul": "model.safetensors\0x",
        "directory": "sub",
        "empty part": "sub//x",
    }[kind]
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"size": 13, "sha256": "0" * 64}
    (path / "manifest.json").write_text(json.dumps(manifest))
    problems = checkpoint.verify(path)
    assert problems and "manifest.json" in problems[0] and repr(name) in problems[0]
    if kind == "directory":
        assert "not listed" not in problems[0]
    assert not any(outside in p.parents or p.name == "precious.txt" for p in opened)
    run, _ = fresh_run(out, resume=str(path))
    with pytest.raises(CheckpointError, match=r"manifest\.json"):
        run.fit()


@pytest.mark.parametrize("name", ["model.safetensors", "model.safetensors.index.json", "extra"])
def test_a_file_not_in_the_manifest_is_refused_not_read(
    out: Path, name: str, opened: list[Path]
) -> None:
    path = out / "checkpoints" / STEP4
    if name == "model.safetensors":  # a manifest regenerated without the weights
        manifest = json.loads((path / "manifest.json").read_text())
        del manifest["files"][name]
        (path / "manifest.json").write_text(json.dumps(manifest))
    else:
        (path / name).write_text("{}")
    opened.clear()
    problems = checkpoint.verify(path)
    assert problems and "not listed" in problems[-1] and name in problems[-1]
    assert path / name not in opened
    with pytest.raises(CheckpointError, match="not listed"):
        treadle.load_weights(toy.model(width=8, dropout=0.2), path)
    run, _ = fresh_run(out, resume=str(path))
    with pytest.raises(CheckpointError, match="not listed"):
        run.fit()


def test_dcp_metadata_whose_relative_path_climbs_out_is_refused(tmp_path: Path) -> None:
    from treadle.plugins.checkpoint.dcp_format import DCPFormat

    fmt = DCPFormat()
    fmt.save_tensors(tmp_path / "mine", "model", {"w": torch.zeros(3)})
    fmt.save_tensors(tmp_path / "theirs", "model", {"w": torch.ones(3)})
    metadata_file = tmp_path / "mine" / "model" / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # the test's own file: trusted
    for info in metadata.storage_data.values():
        info.relative_path = f"../../theirs/model/{info.relative_path}"
    metadata_file.write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"\.metadata names the file '\.\./\.\./theirs"):
        fmt.load_tensors(tmp_path / "mine", "model")


# ------------------------------------------------------------------ 6. FIFOs


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["manifest.json", "state.json", "model.safetensors", "notes"])
def test_a_fifo_in_a_checkpoint_never_blocks(out: Path, tmp_path: Path, name: str) -> None:
    path = out / "checkpoints" / STEP4
    (path / name).unlink(missing_ok=True)
    os.mkfifo(path / name)
    problems = checkpoint.verify(path)
    assert problems and "not a regular file" in problems[0] and name in problems[0]
    model = toy.model(width=8, dropout=0.2)
    with pytest.raises(CheckpointError, match="not a regular file"):
        treadle.load_weights(model, path)
    try:  # unchecked: it may load (the FIFO is not needed), but never blocks on it
        treadle.load_weights(model, path, check=False)
    except TreadleError as exc:
        assert "regular file" in str(exc) or "no safetensors checkpoint" in str(exc)
    with pytest.raises(CheckpointError, match="not a regular file"):
        export(path, tmp_path / "export")
    run, recorder = fresh_run(out, resume="auto")
    with pytest.warns(TreadleWarning, match=rf"{STEP4}.*{name}.*not a regular file"):
        run.fit()
    assert recorder.started_at == 2


# ------------------------------------------------------------------ damaged, not hostile


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _edit_json(name: str, edit: Callable[[Any], Any]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        data = json.loads((path / name).read_text())
        edit(data)
        (path / name).write_text(json.dumps(data))

    return damage


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda path: (path / name).write_bytes(data)


def _set(key: str, value: Any) -> Callable[[Any], None]:
    def edit(data: Any) -> None:
        *parents, last = key.split(".")
        for part in parents:
            data = data[part]
        data[last] = value

    return edit


DAMAGED: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # id: (damage, file named, field named)
    "nested json": (_write("state.json", _nested(100_000)), "state.json", "JSON"),
    "not an object": (_write("state.json", b"[1, 2]"), "state.json", "JSON object"),
    "not utf-8": (_write("state.json", b'{"format": "\xff\xfe"}'), "state.json", "UTF-8"),
    "step is a string": (_edit_json("state.json", _set("state.step", "3")), "state.json", "state.step"),
    "unknown state field": (_edit_json("state.json", _set("state.bogus", 1)), "state.json", "bogus"),
    "format missing": (_edit_json("state.json", lambda d: d.pop("format")), "state.json", "format"),
    "format not a string": (_edit_json("state.json", _set("format", 7)), "state.json", "format"),
    "data wrong type": (_edit_json("state.json", _set("data", [1])), "state.json", "data"),
    "torch rng not hex": (_edit_json("rng-rank00000.json", _set("torch", "zz")), "rng-rank00000.json", "torch"),
    "torch rng too short": (_edit_json("rng-rank00000.json", _set("torch", "00" * 10)), "rng-rank00000.json", "torch"),
    "numpy rng wrong length": (_edit_json("rng-rank00000.json", _set("numpy", ["MT19937", [1, 2], 0, 0, 0.0])), "rng-rank00000.json", "numpy"),
    "python rng missing": (_edit_json("rng-rank00000.json", lambda d: d.pop("python")), "rng-rank00000.json", "python"),
    "rng file missing": (lambda p: (p / "rng-rank00000.json").unlink(), "rng-rank00000.json", "cannot be read"),
    "optimizer not a state dict": (_edit_json("optimizer.json", _set("value", 5)), "optimizer.json", "value"),
    "optimizer tensor reference": (_edit_json("optimizer.json", _set("value.state.__items__", [[0, {"step": {"__tensor__": "nope"}}]])), "optimizer.json", "value"),
    "scheduler of another form": (_edit_json("scheduler.json", _set("value", {"x": 1})), "scheduler.json", "value"),
    "plugins not a mapping": (_edit_json("plugins.json", _set("value", [1])), "plugins.json", "value"),
    "tensors flag missing": (_edit_json("precision.json", lambda d: d.pop("tensors")), "precision.json", "tensors"),
}  # fmt: skip


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_content_is_a_checkpoint_error_even_with_a_consistent_manifest(
    out: Path, case: str
) -> None:
    damage, file, field = DAMAGED[case]
    path = out / "checkpoints" / STEP4
    damage(path)
    regenerate_manifest(path)
    assert checkpoint.verify(path) == []

    run, _ = fresh_run(out, resume=str(path))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    with pytest.raises(CheckpointError) as caught:
        run.fit()
    assert file in str(caught.value) and field in str(caught.value)
    # checked before anything was applied: the run is as it was built
    assert run.state.step == 0
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())

    run, recorder = fresh_run(out, resume="auto")
    with pytest.warns(TreadleWarning, match=rf"skipping damaged checkpoint .*{STEP4}.*{file}"):
        run.fit()
    assert recorder.started_at == 2


def test_a_manifest_size_that_is_not_an_integer(out: Path) -> None:
    path = out / "checkpoints" / STEP4
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model.safetensors"]["size"] = "12"
    (path / "manifest.json").write_text(json.dumps(manifest))
    problems = checkpoint.verify(path)
    assert len(problems) == 1
    assert "manifest.json" in problems[0] and "'model.safetensors'].size" in problems[0]
