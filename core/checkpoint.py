"""Checkpoint directories that are never half-written: save, publish, rotate, verify, find.

The directory protocol is the kernel's; the files for tensors are the checkpoint format's. A
checkpoint is written under a temporary name, every file is fsynced and listed with its size
and SHA-256 in ``manifest.json``, the directory is renamed into place, and only then does
``latest`` move and do old checkpoints get deleted. A crash at any instant leaves the previous
checkpoint whole. Reading one back into a run is ``treadle.resume``'s. The layout is
documented in ``docs/checkpoints.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import stat
import threading
import typing
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from treadle.components import CheckpointFormat
from treadle.data import ResumableSampler
from treadle.errors import CheckpointError, TreadleError, TreadleWarning

if TYPE_CHECKING:
    from treadle.config import Config
    from treadle.run import Run

__all__ = [
    "checkpoints_dir", "find_resumable", "finish_pending", "resolve", "save", "verify",
    "write_folder",
]  # fmt: skip

MANIFEST = "manifest.json"
STATE = "state.json"
LATEST = "latest"
#: Version of the directory layout, written to ``state.json``.
LAYOUT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMP_DIR = re.compile(r"^\.step-(\d+)\.(tmp|old|del)$")


def checkpoints_dir(run: Run) -> Path:
    """``OUTPUT/checkpoints``: where the run's checkpoint directories live."""
    return Path(run.output_dir) / "checkpoints"


# ------------------------------------------------------------------ save


def save(run: Run, *, background: bool = False) -> Path:
    """Write a complete checkpoint of the run's current step; returns its directory.

    Every rank writes its RNG state; the main process writes everything else (the strategy
    gathers what it must first). The directory is renamed into place only once every file is
    written, fsynced and in the manifest; then ``latest`` moves, then old ones are rotated out.

    With ``background`` (``Config.save_async``), the step waits only while the state is
    copied to host memory; a thread writes, publishes and rotates, and the save is complete
    when ``finish_pending`` returns (called by the next save and at the end of ``fit``). At
    most one save is in flight.
    """
    finish_pending(run)
    fmt, strategy, state = run.checkpoint_format, run.strategy, run.state
    if fmt is None:
        raise TreadleError("this run has checkpoint=None; name a checkpoint format to save")
    run.fold_tokens()
    root = checkpoints_dir(run)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".step-{state.step:06d}.tmp"
    if run.is_main_process:
        _checked_root(root).mkdir(parents=True, exist_ok=True)
        _recover(root)  # leftovers of an interrupted save; a planted link is unlinked here
        tmp.mkdir()  # never through a link: mkdir fails on any existing name
    strategy.barrier()
    _write_json(tmp / f"rng-rank{strategy.rank:05d}.json", _rng_state(run.device), indent=None)
    plugin_state: dict[str, Any] = {}
    run.emit("on_save_checkpoint", run=run, plugin_state=plugin_state)
    sharded = fmt.sharded  # every rank writes its part of the weights and optimizer state
    model_state = strategy.model_state_dict(run.wrapped_model, sharded=sharded)
    optimizer_state = (
        strategy.optimizer_state_dict(run.optimizer, sharded=sharded) if run.optimizer else None
    )
    if sharded:
        _save_sharded(run, fmt, tmp, model_state, optimizer_state)
    files = None
    if run.is_main_process:
        states = {
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "precision": run.precision.state_dict(),
            "plugins": plugin_state,
        }
        if not sharded:
            states["optimizer"] = optimizer_state
        # a background write needs its own copy: training goes on changing the tensors
        files = _Files(
            fmt,
            tmp,
            run.model,  # read only for the names it declares tied
            None if sharded else _copied(model_state, background),
            {stem: _encoded(value, background) for stem, value in states.items()},
            _meta(run, fmt),
        )
    run.fit_state.last_save_step = state.step
    if background:
        strategy.barrier()  # every rank's RNG file is in place before the writer lists them
        writer = _IN_FLIGHT[run] = _Writer(files, root, final, run.config)
        writer.start()
        return final
    if files is not None:
        files.write()
    strategy.barrier()
    if run.is_main_process:
        _write_manifest(tmp)
        _publish(root, tmp, final)
        _rotate(run.config, root, final)
    strategy.barrier()
    _saved(run, final)
    return final


class _Files(NamedTuple):
    """What the main process writes into a checkpoint's temporary directory."""

    fmt: CheckpointFormat
    directory: Path
    model: nn.Module
    model_state: Mapping[str, torch.Tensor] | None
    states: dict[str, tuple[Any, dict[str, torch.Tensor]] | None]
    meta: dict[str, Any]

    def write(self) -> None:
        if self.model_state is not None:
            self.fmt.save_model(self.directory, self.model, self.model_state)
        for stem, encoded in self.states.items():
            if encoded is not None:
                _write_state(self.fmt, self.directory, stem, *encoded)
        _write_json(self.directory / STATE, self.meta)


class _Writer(threading.Thread):
    """The background half of a save: write, fsync, publish, rotate; keeps its error."""

    def __init__(self, files: _Files | None, root: Path, final: Path, config: Config) -> None:
        # not a daemon: an interpreter that exits while a save is in flight finishes it first
        super().__init__(name="treadle-checkpoint-writer")
        self.files, self.root, self.final, self.config = files, root, final, config
        self.error: BaseException | None = None

    def run(self) -> None:
        if self.files is None:
            return  # not the main process: its RNG file is written already
        try:
            self.files.write()
            _write_manifest(self.files.directory)
            _publish(self.root, self.files.directory, self.final)
            _rotate(self.config, self.root, self.final)
        except BaseException as exc:  # reported on the training thread by finish_pending
            self.error = exc


_IN_FLIGHT: weakref.WeakKeyDictionary[Run, _Writer] = weakref.WeakKeyDictionary()


def finish_pending(run: Run) -> Path | None:
    """Wait for the run's background save, if one is in flight; returns its directory.

    Every rank calls it at the same points (before a save, at the end of ``fit``), so a
    failure on the writing rank raises on all of them.
    """
    writer = _IN_FLIGHT.pop(run, None)
    if writer is None:
        return None
    writer.join()
    error, final = writer.error, writer.final
    if run.strategy.agree(int(error is not None)):
        tmp = final.with_name(f".{final.name}.tmp")
        raise CheckpointError(
            f"the background save of {final.name} failed"
            + (" on another rank" if error is None else f": {type(error).__name__}: {error}")
            + f"; the previous checkpoint is whole, and {tmp.name} is removed at the next save"
        ) from error
    _saved(run, final)
    return final


def _saved(run: Run, final: Path) -> None:
    run.last_checkpoint = final
    run.emit("on_save_end", run=run, path=final)


def _copied(state: Mapping[str, torch.Tensor], copy: bool) -> Mapping[str, torch.Tensor]:
    if not copy:
        return state
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final`` and point ``latest`` at it.

    Saving a step that exists already (a run resumed from an older checkpoint into the same
    directory) swaps two directories, which no portable rename does atomically. So ``latest``
    first moves to the newest other checkpoint, the old ``final`` becomes ``.step-N.old``, the
    new one takes its name, and only then is the old one deleted. A rename that fails puts the
    old one back; a crash between the two renames leaves a complete ``.old`` that the next
    start renames back (``_recover``).
    """
    if os.path.lexists(final):
        others = [p for p in _step_dirs(root) if p != final]
        if others:
            _write_text_atomic(root / LATEST, max(others, key=_step_of).name + "\n")
        old = final.with_name(f".{final.name}.old")
        _remove_tree(old)
        os.replace(final, old)  # renames a planted link itself, never what it points to
        try:
            os.replace(tmp, final)
        except OSError as exc:
            os.replace(old, final)
            _write_text_atomic(root / LATEST, final.name + "\n")
            raise CheckpointError(
                f"cannot rename {tmp} to {final} ({exc}); the previous {final.name} is kept "
                "and the new one stays in the hidden directory until the next save"
            ) from exc
        _remove_tree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(root / LATEST, final.name + "\n")
    _fsync_dir(root)


def _checked_root(root: Path) -> Path:
    """``root`` itself: refused if it is a link (checkpoints would be written elsewhere)."""
    if root.is_symlink():
        raise CheckpointError(
            f"{root} is a symbolic link; treadle never reads or writes checkpoints through a "
            "link. To keep checkpoints on another disk, point Config.output_dir there instead"
        )
    return root


def _recover(root: Path) -> None:
    """Finish what an interrupted save or rotation left in ``root`` (main process only).

    A ``.step-N.old`` whose ``step-N`` is missing (a crash between the two renames of a
    re-save) is renamed back if it verifies; every other leftover (``.tmp``, ``.del``, an
    ``.old`` with its ``step-N`` in place, a planted link of any of those names) is removed.
    """
    if not _checked_root(root).is_dir():
        return
    for entry in os.scandir(root):
        match = _TEMP_DIR.match(entry.name)
        if match is None and entry.name != f".{LATEST}.tmp":
            continue
        path = Path(entry.path)
        if match is not None and match.group(2) == "old":
            final = root / f"step-{match.group(1)}"
            if not os.path.lexists(final) and not verify(path):
                os.replace(path, final)
                warnings.warn(
                    f"{final.name} was hidden as {path.name} by an interrupted save; restored it",
                    TreadleWarning,
                    stacklevel=3,
                )
                continue
        _remove_tree(path)
    _fsync_dir(root)


def write_folder(out: Path, write: Callable[[Path], Any], meta: Mapping[str, Any]) -> Path:
    """Write a folder that treadle verifies and reads as it does a checkpoint (``treadle
    export`` writes one): ``write(directory)`` writes the files into a temporary sibling of
    ``out``; ``meta`` becomes its ``state.json``, a manifest lists every file, and it is
    renamed to ``out`` (an empty directory there is replaced). A failure leaves nothing."""
    tmp = out.with_name(f".{out.name}.tmp")
    _remove_tree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _write_json(tmp / STATE, dict(meta))
        _write_manifest(tmp)
    except BaseException:
        _remove_tree(tmp)
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    return out


def _remove_tree(path: Path) -> None:
    """Delete ``path`` whatever it is; a link is unlinked, never followed."""
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)  # rmtree does not follow links inside the tree


def _save_sharded(
    run: Run,
    fmt: CheckpointFormat,
    directory: Path,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any] | None,
) -> None:
    """On every rank: its shards, through the format's collective ``save_sharded``."""
    fmt.save_sharded(directory, "model", model_state)
    if optimizer_state is not None:
        tensors: dict[str, torch.Tensor] = {}
        encoded = _encode(optimizer_state, "", tensors, cpu=False)  # the format copies shards
        fmt.save_sharded(directory, "optimizer", tensors)
        if run.is_main_process:
            _write_json(directory / "optimizer.json", {"tensors": bool(tensors), "value": encoded})


def _meta(run: Run, fmt: CheckpointFormat) -> dict[str, Any]:
    """``state.json``: counters, data position, the format's name and the ranking metric."""
    state, config = run.state, run.config
    # A checkpoint is ranked by the monitored metric only if it was logged at this very step:
    # an older value would describe other weights.
    metric = None
    if config.monitor is not None and run.fit_state.monitor_step == state.step:
        value = state.last_metrics.get(config.monitor)
        if isinstance(value, int | float) and math.isfinite(value):
            metric = float(value)
    sampler = getattr(run.fit_state.train_loader, "sampler", None)
    sampler_state = sampler.state_dict() if isinstance(sampler, ResumableSampler) else None
    return {
        "layout": LAYOUT_VERSION,
        "format": fmt.name,
        "step": state.step,
        "state": state.to_dict(),
        "data": {
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "batches_per_epoch": run.fit_state.batches_per_epoch,
            "sampler": sampler_state,
        },
        "world_size": run.strategy.world_size,
        "monitor": config.monitor,
        "monitor_mode": config.monitor_mode,
        "metric": metric,
        # a final stop at this step (resuming trains no further; not a preemption, not a
        # limit: a larger max_steps trains on), and why an emergency checkpoint was written
        "stopped": run.fit_state.final_stop if run.fit_state.stopping else None,
        "emergency": run.fit_state.emergency,
    }


def _rotate(config: Config, root: Path, newest: Path) -> None:
    """Delete checkpoints beyond the ``keep_last`` newest, sparing the ``keep_best`` best.

    Runs only after ``newest`` is complete and ``latest`` names it. Checkpoints with a higher
    step than ``newest`` (left by another line of this run, e.g. after resuming from an older
    path) are neither counted nor deleted: they are not this line's to judge.
    """
    if config.keep_last is None:
        return
    line = sorted((p for p in _step_dirs(root) if _step_of(p) <= _step_of(newest)), key=_step_of)
    keep = {newest, *line[-config.keep_last :]}
    if config.keep_best:
        scored = []
        for path in line:
            metric = _metric_of(path)
            if metric is not None:
                scored.append((metric if config.monitor_mode == "min" else -metric, _step_of(path)))
        # Ties go to the earlier checkpoint: it reached that value first.
        keep.update(root / f"step-{step:06d}" for _, step in sorted(scored)[: config.keep_best])
    for path in line:
        if path not in keep:
            _remove(path)


def _remove(path: Path) -> None:
    """Delete a checkpoint: renamed out of sight first, so no half-deleted one is ever seen."""
    trash = path.with_name(f".{path.name}.del")
    os.replace(path, trash)
    _remove_tree(trash)


def _metric_of(path: Path) -> float | None:
    try:
        metric = _read_json(path / STATE).get("metric")
    except (OSError, CheckpointError):
        return None  # unreadable: never ranked, so only keep_last decides about it
    return float(metric) if isinstance(metric, int | float) and math.isfinite(metric) else None


# ------------------------------------------------------------------ verify and find


def verify(path: Path) -> list[str]:
    """Problems with the checkpoint at ``path``: each names a missing, truncated or altered file.

    The directory is listed first without following links: a link, a FIFO, a device or a
    socket anywhere in it, or a file that ``manifest.json`` does not list, makes it damaged.
    Every name in the manifest is checked before any file is opened; then each file's size,
    then its SHA-256. An empty list means the checkpoint is exactly as it was written.
    """
    path = Path(path)
    try:
        on_disk = _regular_files(path)
        entries = _manifest_entries(path)
    except CheckpointError as exc:
        return [str(exc)]
    problems = []
    for name, size, digest in entries:
        file = path / name
        if file.is_dir():
            problems.append(f"{path / MANIFEST}: the entry {name!r} is a directory, not a file")
        elif name not in on_disk:
            problems.append(f"{file}: missing")
        elif on_disk[name] != size:
            problems.append(
                f"{file}: truncated or extended ({on_disk[name]} bytes, {size} expected)"
            )
        elif _sha256(file) != digest:
            problems.append(f"{file}: altered (SHA-256 differs from the manifest)")
    unlisted = sorted(on_disk.keys() - {MANIFEST} - {name for name, _, _ in entries})
    if unlisted:
        problems.append(f"{path}: files not listed in {MANIFEST}: {', '.join(unlisted)}")
    return problems


def _regular_files(directory: Path) -> dict[str, int]:
    """``{relative name: size}`` of every file under ``directory``, found without following
    a link and without opening a file.

    Raises:
        CheckpointError: ``directory`` or anything in it is a link, a FIFO, a device or a
            socket, or it cannot be listed.
    """
    found: dict[str, int] = {}
    try:
        if not stat.S_ISDIR(os.lstat(directory).st_mode):
            raise CheckpointError(f"{directory}: {_kind(os.lstat(directory).st_mode)}")
        for name, info in _tree(directory):
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError(f"{directory / name}: {_kind(info.st_mode)}")
            found[name] = info.st_size
    except OSError as exc:
        raise CheckpointError(f"{directory}: cannot be listed ({exc})") from exc
    return found


def _tree(directory: Path) -> Iterator[tuple[str, os.stat_result]]:
    """``(relative name, lstat)`` of everything under ``directory`` but its folders."""
    pending = [(directory, "")]
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as entries:
            listed = [
                (Path(e.path), prefix + e.name, e.stat(follow_symlinks=False)) for e in entries
            ]
        for path, name, info in listed:
            if stat.S_ISDIR(info.st_mode):
                pending.append((path, name + "/"))
            else:
                yield name, info


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "is a symbolic link; treadle never follows a link in a checkpoint"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    return "is not a regular file (a FIFO, socket or device); only regular files are read"


def _manifest_entries(path: Path) -> list[tuple[str, int, str]]:
    """``(name, size, sha256)`` of every file ``manifest.json`` lists, each name checked."""
    manifest = path / MANIFEST
    files = _read_json(manifest).get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest}: field 'files' must be an object, got {files!r:.80}")
    entries = []
    for name, entry in files.items():
        _checked_name(path, name, manifest)
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not _is_int(size) or size < 0:
            raise CheckpointError(
                f"{manifest}: files[{name!r}].size must be a byte count, got {size!r:.80}"
            )
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise CheckpointError(
                f"{manifest}: files[{name!r}].sha256 must be 64 hex digits, got {digest!r:.80}"
            )
        entries.append((name, size, digest))
    if STATE not in files:
        raise CheckpointError(f"{manifest}: does not list {STATE}")
    return entries


def _checked_name(directory: Path, name: str, listed_in: Path) -> Path:
    """``directory / name`` for a name read from a file, refused unless it stays inside."""
    parts = name.split("/")
    if "\0" in name or "\\" in name or any(part in ("", ".", "..") for part in parts):
        raise CheckpointError(
            f"{listed_in}: the entry {name!r} is not a relative name inside {directory} "
            "(absolute, '..', empty parts, backslashes and NUL bytes are refused)"
        )
    return directory.joinpath(*parts)


def find_resumable(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; damaged ones are skipped with a warning.

    Raises:
        CheckpointError: there are checkpoints, but none of them verifies.
    """
    return _newest_good(Path(root), lambda path: None)


def _newest_good(root: Path, load: Callable[[Path], None]) -> Path | None:
    """The newest ``step-NNNNNN`` in ``root`` that verifies and that ``load`` takes (a
    ``CheckpointError`` refuses it); the others are skipped with a warning saying why.

    Raises:
        CheckpointError: there are checkpoints, but none of them verifies and loads.
    """
    _checked_root(root)
    names = os.listdir(root) if root.is_dir() else []  # links too: verify says why they are refused
    candidates = sorted((root / n for n in names if _STEP_DIR.match(n)), key=_step_of, reverse=True)
    for path in candidates:
        problems = verify(path)
        if not problems:
            try:
                load(path)
                return path
            except CheckpointError as exc:
                problems = [str(exc)]
        warnings.warn(
            f"skipping damaged checkpoint {path}: {'; '.join(problems)}; trying the previous one",
            TreadleWarning,
            stacklevel=3,  # the caller of find_resumable or of treadle.resume.resume
        )
    if candidates:
        # Starting over would silently throw away the run: a person should decide.
        raise CheckpointError(
            f"every checkpoint in {root} is damaged (see the warnings above); move them away "
            "to start afresh, or pass Config.resume a checkpoint path"
        )
    return None


def resolve(path: Path | str) -> Path:
    """The checkpoint directory that ``path`` names.

    ``path`` may be a checkpoint directory (``.../checkpoints/step-000120``), a directory of
    checkpoints (its newest valid one is taken) or a run's output directory (the same, in
    its ``checkpoints/``).

    Raises:
        TreadleError: nothing there is a checkpoint, or every checkpoint there is damaged.
    """
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / STATE).is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = find_resumable(root) if root.is_dir() else None
    if found is None:
        raise TreadleError(
            f"{path} is not a checkpoint: it has no {MANIFEST}, and no step-NNNNNN checkpoint "
            "directories (nor a checkpoints/ directory holding them)"
        )
    return found


def _step_dirs(root: Path) -> list[Path]:
    """The real ``step-NNNNNN`` directories in ``root`` (a link of that name is not one)."""
    if not root.is_dir():
        return []
    return [
        Path(e.path)
        for e in os.scandir(root)
        if _STEP_DIR.match(e.name) and e.is_dir(follow_symlinks=False)
    ]


def _step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


# ------------------------------------------------------------------ state as JSON + tensors


def _encode(
    obj: Any, key: str, tensors: dict[str, torch.Tensor], *, cpu: bool = True, copy: bool = False
) -> Any:
    """JSON-able structure; tensors go to ``tensors`` (on CPU if ``cpu``; copies if ``copy``)
    and are referenced by key."""
    if isinstance(obj, torch.Tensor):
        if copy:
            tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        else:
            tensors[key] = obj.detach().cpu().contiguous() if cpu else obj.detach()
        return {"__tensor__": key}

    def inner(value: Any, at: str) -> Any:
        return _encode(value, at, tensors, cpu=cpu, copy=copy)

    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: inner(v, f"{key}.{k}" if key else k) for k, v in obj.items()}
        return {"__items__": [[k, inner(v, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [inner(v, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [inner(v, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise TreadleError(
        f"cannot store {type(obj).__name__} at {key!r} in a checkpoint: only tensors, numbers, "
        "strings, lists, tuples and dicts are stored (nothing is pickled)"
    )


def _encoded(obj: Any, copy: bool = False) -> tuple[Any, dict[str, torch.Tensor]] | None:
    """``obj`` as JSON-able structure plus its tensors (owned copies with ``copy``); None: None."""
    if obj is None:
        return None
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(obj, "", tensors, copy=copy)
    return encoded, tensors


def _write_state(
    fmt: CheckpointFormat,
    directory: Path,
    stem: str,
    encoded: Any,
    tensors: dict[str, torch.Tensor],
) -> None:
    """``{stem}.json``, with any tensors in it written by the format under the same stem."""
    if tensors:
        fmt.save_tensors(directory, stem, tensors)
    _write_json(directory / f"{stem}.json", {"tensors": bool(tensors), "value": encoded})


def _rng_state(device: torch.device) -> dict[str, Any]:
    python_state = random.getstate()
    numpy_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict[str, Any] = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *map(_plain, numpy_state[2:])],
        "torch": _hex(torch.get_rng_state()),
    }
    module = _device_rng(device)
    if module is not None:
        state["device"] = _hex(module.get_rng_state(device))
    return state


def _device_rng(device: torch.device) -> Any:
    """The torch module with ``device``'s generator (``torch.cuda``, ...); None for the CPU."""
    module = getattr(torch, device.type, None) if device.type != "cpu" else None
    return module if hasattr(module, "get_rng_state") else None


def _hex(state: torch.Tensor) -> str:
    """A generator's byte state as a hex string (compact, exact, still plain JSON)."""
    return bytes(state.cpu().numpy().tobytes()).hex()


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


# ------------------------------------------------------------------ files


def _write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    """A file inside a temporary checkpoint directory: ``_write_manifest`` makes it durable."""
    path.write_text(json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file; anything else is a ``CheckpointError`` naming it."""
    with _open_regular(path) as handle:
        data = handle.read()
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(
            f"{path}: not valid UTF-8 JSON ({type(exc).__name__}: {exc!s:.200})"
        ) from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, not {type(value).__name__}")
    return value


def _open_regular(path: Path) -> typing.BinaryIO:
    """Open a regular file for reading: never through a final link, never blocking on a FIFO.

    Raises:
        CheckpointError: ``path`` is missing, a link, or not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        why = _kind(stat.S_IFLNK) if path.is_symlink() else f"cannot be read ({exc.strerror})"
        raise CheckpointError(f"{path}: {why}") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointError(f"{path}: {_kind(mode)}")
    return os.fdopen(fd, "rb")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if os.path.lexists(tmp):
        tmp.unlink()  # a leftover, or a planted link: never written through
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_manifest(directory: Path) -> None:
    """List every file with its size and SHA-256, after making each file and folder durable."""
    files = {}
    for name in sorted(_regular_files(directory).keys() - {MANIFEST}):
        file = directory / name
        with _open_regular(file) as handle:
            os.fsync(handle.fileno())
        files[name] = {"size": file.stat().st_size, "sha256": _sha256(file)}
    for folder in {parent for name in files for parent in (directory / name).parents}:
        if directory in folder.parents:  # the sub-directories; ``directory`` itself below
            _fsync_dir(folder)
    _write_text_atomic(directory / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")
    _fsync_dir(directory)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with _open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_int(value: Any) -> typing.TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
