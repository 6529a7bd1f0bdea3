"""Checkpoint directories that are never half-written: save, verify, rotate, resume, export.

The directory protocol is the kernel's; the files for tensors are the checkpoint format's. A
checkpoint is written under a temporary name, every file is fsynced and listed with its size
and SHA-256 in ``manifest.json``, the directory is renamed into place, and only then does
``latest`` move and do old checkpoints get deleted. A crash at any instant leaves the previous
checkpoint whole. Everything loads from JSON or from the format's tensor files: nothing is
unpickled. The layout is documented in ``docs/checkpoints.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
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
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs
import numpy as np
import torch
from torch import nn

from treadle import registry
from treadle.components import CheckpointFormat
from treadle.data import ResumableSampler
from treadle.errors import CheckpointError, ConfigError, TreadleError, TreadleWarning
from treadle.state import State

if TYPE_CHECKING:
    from treadle.config import Config
    from treadle.run import Run

__all__ = [
    "export",
    "find_resumable",
    "finish_pending",
    "load",
    "load_weights",
    "resolve",
    "resume",
    "rng_preserved",
    "save",
    "verify",
]

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
    run._last_save_step = state.step
    if background:
        _IN_FLIGHT[run] = _InFlight(final, _start_writing(files, root, final, run.config))
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


class _InFlight(NamedTuple):
    final: Path
    thread: _Writer


class _Writer(threading.Thread):
    """The background half of a save: write, fsync, publish, rotate; keeps its error."""

    def __init__(self, work: Callable[[], None]) -> None:
        # not a daemon: an interpreter that exits while a save is in flight finishes it first
        super().__init__(name="treadle-checkpoint-writer")
        self.work = work
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.work()
        except BaseException as exc:  # reported on the training thread by finish_pending
            self.error = exc


_IN_FLIGHT: weakref.WeakKeyDictionary[Run, _InFlight] = weakref.WeakKeyDictionary()


def _start_writing(files: _Files | None, root: Path, final: Path, config: Any) -> _Writer:
    def work() -> None:
        if files is None:
            return  # not the main process: its RNG file is written already
        files.write()
        _write_manifest(files.directory)
        _publish(root, files.directory, final)
        _rotate(config, root, final)

    writer = _Writer(work)
    writer.start()
    return writer


def finish_pending(run: Run) -> Path | None:
    """Wait for the run's background save, if one is in flight; returns its directory.

    Every rank calls it at the same points (before a save, at the end of ``fit``), so a
    failure on the writing rank raises on all of them.
    """
    pending = _IN_FLIGHT.pop(run, None)
    if pending is None:
        return None
    pending.thread.join()
    error = pending.thread.error
    if run.strategy.agree(int(error is not None)):
        tmp = pending.final.with_name(f".{pending.final.name}.tmp")
        raise CheckpointError(
            f"the background save of {pending.final.name} failed"
            + (" on another rank" if error is None else f": {type(error).__name__}: {error}")
            + f"; the previous checkpoint is whole, and {tmp.name} is removed at the next save"
        ) from error
    _saved(run, pending.final)
    return pending.final


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
    if config.monitor is not None and run._monitor_step == state.step:
        value = state.last_metrics.get(config.monitor)
        if isinstance(value, int | float) and math.isfinite(value):
            metric = float(value)
    loader = getattr(run, "_train_loader", None)
    sampler = getattr(loader, "sampler", None)
    sampler_state = sampler.state_dict() if isinstance(sampler, ResumableSampler) else None
    return {
        "layout": LAYOUT_VERSION,
        "format": fmt.name,
        "step": state.step,
        "state": state.to_dict(),
        "data": {
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "batches_per_epoch": run._batches_per_epoch,
            "sampler": sampler_state,
        },
        "world_size": run.strategy.world_size,
        "monitor": config.monitor,
        "monitor_mode": config.monitor_mode,
        "metric": metric,
        # a final stop at this step (resuming trains no further; not a preemption, not a
        # limit: a larger max_steps trains on), and why an emergency checkpoint was written
        "stopped": run._final_stop if run._stopping else None,
        "emergency": run._emergency,
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
    pending = [(directory, "")]
    try:
        if not stat.S_ISDIR(os.lstat(directory).st_mode):
            raise CheckpointError(f"{directory}: {_kind(os.lstat(directory).st_mode)}")
        while pending:
            folder, prefix = pending.pop()
            with os.scandir(folder) as entries:
                for entry in entries:
                    mode = entry.stat(follow_symlinks=False).st_mode
                    name = prefix + entry.name
                    if stat.S_ISDIR(mode):
                        pending.append((Path(entry.path), name + "/"))
                    elif stat.S_ISREG(mode):
                        found[name] = entry.stat(follow_symlinks=False).st_size
                    else:
                        raise CheckpointError(f"{directory / name}: {_kind(mode)}")
    except OSError as exc:
        raise CheckpointError(f"{directory}: cannot be listed ({exc})") from exc
    return found


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
    candidates = _candidates(Path(root))
    for path in candidates:
        problems = verify(path)
        if not problems:
            return path
        _warn_skipped(path, "; ".join(problems))
    if candidates:
        raise _all_damaged(root)
    return None


def _candidates(root: Path) -> list[Path]:
    """Every ``step-NNNNNN`` entry in ``root`` (links too: verify says why they are refused),
    newest first."""
    _checked_root(root)
    if not root.is_dir():
        return []
    names = [name for name in os.listdir(root) if _STEP_DIR.match(name)]
    return sorted((root / name for name in names), key=_step_of, reverse=True)


def _warn_skipped(path: Path, why: str) -> None:
    warnings.warn(
        f"skipping damaged checkpoint {path}: {why}; trying the previous one",
        TreadleWarning,
        stacklevel=3,
    )


def _all_damaged(root: Path) -> CheckpointError:
    # Starting over would silently throw away the run: a person should decide.
    return CheckpointError(
        f"every checkpoint in {root} is damaged (see the warnings above); move them away "
        "to start afresh, or pass Config.resume a checkpoint path"
    )


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


# ------------------------------------------------------------------ load


def resume(run: Run) -> None:
    """Apply ``Config.resume``: "auto" (newest valid checkpoint, or a fresh start) or a path.

    With "auto", a checkpoint that does not verify or does not load is skipped with a warning
    saying why, in favour of the previous one. An explicit path must verify and load.
    """
    root = checkpoints_dir(run)
    if run.is_main_process:
        _recover(root)
    run.strategy.barrier()
    spec = run.config.resume
    if spec != "auto":
        path = resolve(str(spec))
        problems = verify(path)
        if problems:
            raise CheckpointError(f"cannot resume from {path}: {'; '.join(problems)}")
        load(run, path)
        return
    candidates = _candidates(root)
    for path in candidates:
        problems = verify(path)
        if not problems:
            try:
                load(run, path)
                return
            except CheckpointError as exc:
                problems = [str(exc)]
        _warn_skipped(path, "; ".join(problems))
    if candidates:
        raise _all_damaged(root)
    run._resumed = True


def load(run: Run, path: Path) -> None:
    """Restore weights, optimizer, scheduler, precision, RNG, state and plugins' state.

    Everything is read and checked before anything in the run changes, so a damaged
    checkpoint (even one with a consistent manifest) fails with a ``CheckpointError`` naming
    the file and the field and leaves the run as it was.
    """
    fmt, strategy = run.checkpoint_format, run.strategy
    assert fmt is not None
    meta = _checked_meta(path)
    if meta.get("weights_only"):
        raise CheckpointError(
            f"{path} holds weights only (an export), not training state; resume from a "
            "checkpoint directory, or load these weights with treadle.load_weights(model, path)"
        )
    if "state" not in meta:
        raise CheckpointError(f"{path / STATE}: field 'state' is missing")
    if meta["format"] != fmt.name:
        raise TreadleError(
            f"checkpoint {path} was written by format {meta['format']!r}, but this run uses "
            f"{fmt.name!r}; pass checkpoint={meta['format']!r}"
        )
    state = _checked_state(path / STATE, meta["state"])
    rng = _read_rng(path, strategy.rank, meta.get("world_size"), run.device)
    # Read (and check) every piece first; apply only when all of it is good.
    optimizer_state = scheduler_state = None
    if not fmt.sharded:
        model_state = fmt.load_model(path, run.model)
        if run.optimizer is not None and (path / "optimizer.json").exists():
            optimizer_state = _load_state(fmt, path, "optimizer")
            _check_optimizer_state(path / "optimizer.json", optimizer_state, run.optimizer)
    if run.scheduler is not None and (path / "scheduler.json").exists():
        scheduler_state = _load_state(fmt, path, "scheduler")
        _check_like(path / "scheduler.json", scheduler_state, run.scheduler.state_dict(), "value")
    precision_state = _load_state(fmt, path, "precision")
    plugin_state = _load_state(fmt, path, "plugins")
    if not isinstance(plugin_state, dict):
        raise CheckpointError(f"{path / 'plugins.json'}: field 'value' must be an object")
    _check_data_position(run, path, meta.get("data") or {})
    with _applying(path):
        if scheduler_state is not None and run.scheduler is not None:
            run.scheduler.load_state_dict(scheduler_state)
        if optimizer_state is not None and run.optimizer is not None:
            strategy.load_optimizer_state_dict(run.optimizer, optimizer_state)
        if fmt.sharded:
            _load_sharded(run, fmt, path)
        else:
            strategy.load_model_state_dict(run.wrapped_model, model_state)
        run.precision.load_state_dict(precision_state)
    for key, value in state.items():
        setattr(run.state, key, value)
    # Why the saving process stopped is not this one's reason, unless the stop was final (an
    # early stop): then the run stays stopped (loop.fit returns at once) until run.clear_stop().
    run._resumed_stop = run.state.stop_reason = meta.get("stopped")
    _set_rng_state(rng, run.device)
    run.resumed_from = path
    run.emit("on_load_checkpoint", run=run, plugin_state=plugin_state)
    run.last_checkpoint = path
    run._last_save_step = run.state.step
    run._resumed = True


@contextlib.contextmanager
def _applying(path: Path) -> Iterator[None]:
    """Name the checkpoint when torch refuses a state the checks above let through."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        raise CheckpointError(
            f"cannot restore {path}: {type(exc).__name__}: {exc}; the run may be partly "
            "restored, so start it again (resume='auto' then tries the previous checkpoint)"
        ) from exc


#: ``state.json``: the type of every field the kernel reads (others are ignored).
_META_FIELDS: dict[str, Any] = {
    "layout": int,
    "format": str,
    "step": int,
    "state": dict,
    "data": dict | None,
    "world_size": int,
    "monitor": str | None,
    "monitor_mode": str | None,
    "metric": float | None,
    "weights_only": bool,
    "source": str,
    "stopped": str | None,
}
_DATA_FIELDS: dict[str, Any] = {
    "epoch": int,
    "batch_in_epoch": int,
    "batches_per_epoch": int | None,
    "sampler": dict | None,
}


def _checked_meta(path: Path) -> dict[str, Any]:
    """``state.json`` of the checkpoint at ``path``, every field the kernel reads checked."""
    file = path / STATE
    meta: dict[str, Any] = _read_json(file)
    _check_fields(file, meta, _META_FIELDS, "")
    _check_fields(file, meta.get("data") or {}, _DATA_FIELDS, "data.")
    if "format" not in meta:
        raise CheckpointError(f"{file}: field 'format' is missing")
    return meta


def _checked_state(file: Path, values: dict[str, Any]) -> dict[str, Any]:
    """The saved ``run.state``: exactly the fields of ``State``, each of its declared type."""
    types = _state_types()
    unknown, missing = values.keys() - types.keys(), types.keys() - values.keys()
    if unknown or missing:
        raise CheckpointError(
            f"{file}: field 'state' has unknown fields {sorted(unknown)} and lacks "
            f"{sorted(missing)}; it must have exactly {sorted(types)}"
        )
    _check_fields(file, values, types, "state.")
    return values


@cache
def _state_types() -> dict[str, Any]:
    return {f.name: f.type for f in attrs.fields(attrs.resolve_types(State))}


def _check_fields(file: Path, values: Mapping[str, Any], types: Mapping[str, Any], at: str) -> None:
    for key, kind in types.items():
        if key in values and not _is_a(values[key], kind):
            raise CheckpointError(
                f"{file}: field {at + key!r} must be {kind}, got {values[key]!r:.80}"
            )


def _is_a(value: Any, kind: Any) -> bool:
    """``isinstance`` for the types of ``State``'s fields, where a bool is no number."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) is dict:
        return isinstance(value, dict) and all(
            isinstance(k, str) and _is_a(v, args[1]) for k, v in value.items()
        )
    if args:  # a union
        return any(_is_a(value, arg) for arg in args)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return _is_int(value)
    return isinstance(value, kind)


def _is_int(value: Any) -> typing.TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_like(file: Path, value: Any, reference: Any, at: str, *, partial: bool = False) -> None:
    """``value`` has the structure of ``reference`` (what this run has now): mappings with at
    least its keys (``partial``: only the keys both have are compared), the same lengths,
    numbers where it has numbers. Extra keys are allowed: a newer torch adds options, and a
    scheduler adds ``initial_lr`` to the optimizer's groups (which is why those are compared
    ``partial``ly: a run may resume with a scheduler the saved one did not have)."""
    if reference is None or value is None:
        return
    if isinstance(reference, Mapping):
        ok = isinstance(value, Mapping) and (partial or reference.keys() <= value.keys())
        if ok:
            for key in reference.keys() & value.keys():
                _check_like(file, value[key], reference[key], f"{at}.{key}", partial=partial)
            return
    elif isinstance(reference, list | tuple):
        ok = isinstance(value, list | tuple) and len(value) == len(reference)
        if ok:
            for index, (item, ref) in enumerate(zip(value, reference)):
                _check_like(file, item, ref, f"{at}[{index}]", partial=partial)
            return
    elif isinstance(reference, bool | str | torch.Tensor):
        ok = isinstance(value, type(reference))
    elif isinstance(reference, int | float):
        ok = _is_a(value, float)
    else:
        ok = True
    if not ok:
        raise CheckpointError(
            f"{file}: field {at!r} is {value!r:.80}, but this run's has the form {reference!r:.80}"
        )


def _check_optimizer_state(file: Path, value: Any, optimizer: torch.optim.Optimizer) -> None:
    """An optimizer state dict whose groups match this optimizer's and whose per-parameter
    state holds only tensors and numbers (torch's ``load_state_dict`` checks little more than
    the group sizes; anything else would fail at the next step)."""
    if not isinstance(value, Mapping) or not isinstance(value.get("state"), Mapping):
        raise CheckpointError(f"{file}: field 'value' must be an optimizer state dict")
    # Parameters are named by index, or by name when the strategy says so (FSDP): only
    # their number is compared; every other option must have this optimizer's form.
    groups, current = value.get("param_groups"), optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups
    ):
        raise CheckpointError(f"{file}: field 'value.param_groups' must be a list of groups")
    _check_like(
        file,
        [{**g, "params": len(g["params"])} for g in groups],
        [{**g, "params": len(g["params"])} for g in current],
        "value.param_groups",
        partial=True,
    )
    for key, entry in value["state"].items():
        if not isinstance(entry, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor | int | float | bool | None)
            for k, v in entry.items()
        ):
            raise CheckpointError(
                f"{file}: field 'value.state.{key}' must map names to tensors or numbers"
            )


def _load_sharded(run: Run, fmt: CheckpointFormat, path: Path) -> None:
    """On every rank: read its shards into the layout the strategy has now (so a checkpoint
    written by another number of ranks is resharded by the format)."""
    strategy, model = run.strategy, run.wrapped_model
    template = strategy.model_state_dict(model, sharded=True)
    loaded = fmt.load_sharded(path, "model", template)
    strategy.load_model_state_dict(model, loaded, sharded=True)
    if run.optimizer is not None and (path / "optimizer.json").exists():
        stored = _read_json(path / "optimizer.json")
        tensors: dict[str, torch.Tensor] = {}
        _encode(strategy.optimizer_state_dict(run.optimizer, sharded=True), "", tensors, cpu=False)
        tensors = fmt.load_sharded(path, "optimizer", tensors) if stored["tensors"] else {}
        state = _decode(stored["value"], tensors)
        strategy.load_optimizer_state_dict(run.optimizer, state, sharded=True)


def _check_data_position(run: Run, path: Path, data: Mapping[str, Any]) -> None:
    """Warn when the data cannot continue where the checkpoint left it."""
    sampler = getattr(getattr(run, "_train_loader", None), "sampler", None)
    saved = data.get("sampler")
    if (
        isinstance(sampler, ResumableSampler)
        and isinstance(saved, Mapping)
        and saved.get("seed") != sampler.seed
    ):
        warnings.warn(
            f"{path} was written with data order seed {saved.get('seed')}, this run uses "
            f"{sampler.seed}: the rest of the epoch will see other samples than it would have",
            TreadleWarning,
            stacklevel=3,
        )
    saved_length = data.get("batches_per_epoch")
    if saved_length is not None and saved_length != run._batches_per_epoch:
        warnings.warn(
            f"{path} was written with {saved_length} batches per epoch, this run has "
            f"{run._batches_per_epoch}: the training data changed, so the position in the "
            "epoch does not mean the same samples",
            TreadleWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------ weights for inference


def load_weights(
    model: nn.Module, path: Path | str, *, strict: bool = True, check: bool = True
) -> Any:
    """Load a checkpoint's (or an export's) weights into ``model``, for inference.

    The tensors are read by the checkpoint format named in the checkpoint's ``state.json``
    (found through the ``treadle.checkpoint`` entry points); nothing is unpickled.

    Args:
        model: the model to fill (built as for training; not wrapped).
        path: a checkpoint directory, a directory of checkpoints (its newest valid one), a
            run's output directory, or a folder written by ``treadle export``.
        strict: require the names to match exactly, as ``nn.Module.load_state_dict`` does.
        check: verify sizes and SHA-256 checksums against the manifest first.

    Returns:
        ``load_state_dict``'s result: the missing and unexpected keys.

    Raises:
        TreadleError: no checkpoint there, a damaged one, or names or shapes that differ.

    Example::

        model = build_model()
        treadle.load_weights(model, "runs/exp1")           # newest valid checkpoint
        treadle.load_weights(model, "runs/exp1/checkpoints/step-000120")
    """
    directory = resolve(path)
    if check:
        problems = verify(directory)
        if problems:
            raise CheckpointError(f"cannot load weights from {directory}: {'; '.join(problems)}")
    fmt = _format_named(_checked_meta(directory)["format"])
    state = fmt.load_model(directory, model) if strict else fmt.load_tensors(directory, "model")
    try:
        return model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise TreadleError(f"cannot load the weights of {directory} into the model: {exc}") from exc


def export(
    source: Path | str, out: Path | str, format: str | Mapping[str, Any] = "safetensors"
) -> Path:
    """Write the weights of a checkpoint as a weights-only folder (``treadle export``).

    The folder holds the model files of ``format`` (for "safetensors": ``model.safetensors``
    or shards with an index, the Hugging Face layout; other formats may add files, through
    ``CheckpointFormat.export_model``), a ``state.json`` naming the format and the step, and
    a ``manifest.json``; it is written under a temporary name and renamed, like a
    checkpoint. ``treadle.load_weights`` reads it.

    Args:
        source: a checkpoint directory, a directory of checkpoints or a run's output directory.
        out: the folder to create; it must not exist yet (an empty directory is replaced).
        format: the checkpoint format to write: its ``treadle.checkpoint`` entry-point name,
            or ``{"name": ..., **options}`` with options for its constructor.

    Returns:
        ``out``.
    """
    directory, out = resolve(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TreadleError(f"{out} already exists; choose a new folder for the export")
    if out.is_symlink():
        raise TreadleError(f"{out} is a symbolic link; choose a new folder for the export")
    problems = verify(directory)
    if problems:
        raise CheckpointError(f"cannot export {directory}: {'; '.join(problems)}")
    meta = _checked_meta(directory)
    reader, writer = _format_named(meta["format"]), _format_named(format)
    tensors = reader.load_tensors(directory, "model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    _remove_tree(tmp)
    tmp.mkdir()
    try:
        writer.export_model(directory, tmp, tensors)
        _write_json(
            tmp / STATE,
            {
                "layout": LAYOUT_VERSION,
                "format": writer.name,
                "weights_only": True,
                "step": meta.get("step"),
                "source": str(directory.resolve()),
            },
        )
        _write_manifest(tmp)
    except BaseException:
        _remove_tree(tmp)  # a failed export leaves nothing behind
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    return out


def _format_named(spec: str | Mapping[str, Any]) -> CheckpointFormat:
    """A checkpoint format by entry-point name, or ``{"name": ..., **options}``."""
    options = dict(spec) if isinstance(spec, Mapping) else {}
    name = options.pop("name", None) if isinstance(spec, Mapping) else spec
    if not isinstance(name, str):
        raise ConfigError(f"a checkpoint format needs a name, got {spec!r}")
    target = registry.load("checkpoint", name)
    try:
        inspect.signature(target).bind(**options)
    except TypeError as exc:
        raise ConfigError(
            f"checkpoint format {name!r}: invalid options {sorted(options)}: {exc}"
        ) from None
    fmt = target(**options)
    if not isinstance(fmt, CheckpointFormat):
        raise TreadleError(f"checkpoint format {name!r} is not a treadle.CheckpointFormat")
    return fmt


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


def _load_state(fmt: CheckpointFormat, directory: Path, stem: str) -> Any:
    file = directory / f"{stem}.json"
    stored = _read_json(file)
    if not isinstance(stored.get("tensors"), bool) or "value" not in stored:
        raise CheckpointError(f"{file}: needs the fields 'tensors' (true or false) and 'value'")
    tensors = fmt.load_tensors(directory, stem) if stored["tensors"] else {}
    try:
        return _decode(stored["value"], tensors)
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{file}: field 'value' is not a stored state ({type(exc).__name__}: {exc!s:.200})"
        ) from exc


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _rng_state(device: torch.device) -> dict[str, Any]:
    python_state = random.getstate()
    numpy_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict[str, Any] = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *map(_plain, numpy_state[2:])],
        "torch": _hex(torch.get_rng_state()),
    }
    module = getattr(torch, device.type, None) if device.type != "cpu" else None
    if module is not None and hasattr(module, "get_rng_state"):
        state["device"] = _hex(module.get_rng_state(device))
    return state


def _hex(state: torch.Tensor) -> str:
    """A generator's byte state as a hex string (compact, exact, still plain JSON)."""
    return bytes(state.cpu().numpy().tobytes()).hex()


def _unhex(text: str | list[int]) -> torch.Tensor:
    data = bytes(text) if isinstance(text, list) else bytes.fromhex(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class _RngState(NamedTuple):
    """One rank's random streams, read and checked, ready to set."""

    python: tuple[Any, ...]
    numpy: tuple[Any, ...]
    torch: torch.Tensor
    device: torch.Tensor | None


def _read_rng(path: Path, rank: int, world_size: Any, device: torch.device) -> _RngState:
    """This rank's RNG file (rank 0's, with a warning, if it has none), checked by setting
    every state on a scratch generator, so that a bad one fails before the run changes."""
    file = path / f"rng-rank{rank:05d}.json"
    if rank != 0 and not file.exists():
        warnings.warn(
            f"{path} has no RNG state for rank {rank} (it was written by "
            f"{world_size} ranks); using rank 0's, so random streams will not "
            "continue exactly",
            TreadleWarning,
            stacklevel=3,
        )
        file = path / "rng-rank00000.json"
    saved = _read_json(file)
    field = "python"
    try:
        version, internal, gauss = saved[field]
        python = (version, tuple(internal), gauss)
        random.Random().setstate(python)
        field = "numpy"
        name, keys, *rest = saved[field]
        numpy = (name, np.array(keys, dtype=np.uint32), *rest)
        np.random.RandomState().set_state(numpy)
        field = "torch"
        torch_state = _unhex(saved[field])
        torch.Generator().set_state(torch_state)
        field = "device"
        device_state = _unhex(saved[field]) if field in saved else None
        module = getattr(torch, device.type, None) if device.type != "cpu" else None
        if (
            device_state is not None
            and hasattr(module, "get_rng_state")
            and device_state.numel() != module.get_rng_state(device).numel()  # type: ignore[union-attr]
        ):
            raise ValueError(f"{device_state.numel()} bytes, not {device.type}'s")
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError, IndexError) as exc:
        missing = isinstance(exc, KeyError)
        raise CheckpointError(
            f"{file}: field {field!r} is {'missing' if missing else 'not a valid state'}"
            + ("" if missing else f" ({type(exc).__name__}: {str(exc)[:200]})")
        ) from exc
    return _RngState(python, numpy, torch_state, device_state)


def _set_rng_state(state: _RngState, device: torch.device) -> None:
    random.setstate(state.python)
    np.random.set_state(state.numpy)
    torch.set_rng_state(state.torch)
    module = getattr(torch, device.type, None) if device.type != "cpu" else None
    if state.device is not None and module is not None and hasattr(module, "set_rng_state"):
        module.set_rng_state(state.device, device)


@contextlib.contextmanager
def rng_preserved(device: torch.device) -> Iterator[None]:
    """Leave every random stream (python, numpy, torch, ``device``) as it was before the block.

    For work that must not shift the training run's random numbers: evaluation (so that a
    run evaluated more or less often, or resumed after a final evaluation, trains alike) and
    re-creating a data iterator when resuming mid-epoch (``DataLoader`` draws a seed from
    torch's generator each time it is iterated).
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    module = getattr(torch, device.type, None) if device.type != "cpu" else None
    device_state = (
        module.get_rng_state(device)
        if module is not None and hasattr(module, "get_rng_state")
        else None
    )
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if device_state is not None and module is not None:
            module.set_rng_state(device_state, device)


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
