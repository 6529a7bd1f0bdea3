"""``directory``: the checkpoint store that keeps each checkpoint as a directory under
``OUTPUT/checkpoints`` and never leaves one half-written.

A checkpoint is written under a temporary name, every file is fsynced and listed with its size
and SHA-256 in ``manifest.json``, the directory is renamed into place, and only then does
``latest`` move and do old checkpoints get deleted (``keep_last``, ``keep_best``). A crash at
any instant leaves the previous checkpoint whole; the next start finishes or removes what an
interrupted save left. The output directory is locked while a run writes it
(``treadle.plugins.checkpoint.lock``). The layout is documented in ``docs/checkpoints.md``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from treadle import checkpoint, registry
from treadle.checkpoint import Snapshot
from treadle.components import CheckpointFormat, CheckpointStore
from treadle.errors import CheckpointError, ConfigError, TreadleError, TreadleWarning
from treadle.plugins.checkpoint import files, lock
from treadle.plugins.checkpoint.files import MANIFEST, STATE, remove_tree, write_json
from treadle.plugins.defaults import check_monitor

if TYPE_CHECKING:
    from treadle.config import Config
    from treadle.run import Run

__all__ = [
    "LATEST",
    "DirectoryStore",
    "checkpoints_dir",
    "find_resumable",
    "resolve",
    "write_folder",
]

LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMP_DIR = re.compile(r"^\.step-(\d+)\.(tmp|old|del)$")


def checkpoints_dir(run: Run) -> Path:
    """``OUTPUT/checkpoints``: where the run's checkpoint directories live."""
    return Path(run.output_dir) / "checkpoints"


class DirectoryStore(CheckpointStore):
    """Checkpoint directories that are never half-written; see the module's docstring."""

    name = "directory"

    def check(self, run: Run) -> None:
        _check_output_dir(run.config.output_dir)
        if run.config.keep_best and run.config.monitor is not None:
            check_monitor(run, run.config.monitor, "Config.monitor (keep_best)")
        fmt = run.checkpoint_format
        if not run.config.save_async:
            return
        if fmt is None:
            raise ConfigError(
                "Config.save_async = True is not allowed with checkpoint=None: nothing is saved. "
                "Name a checkpoint format, or unset save_async."
            )
        if fmt.sharded:
            raise ConfigError(
                f"Config.save_async = True is not allowed with checkpoint={fmt.name!r}: that "
                "format writes shards from every rank together, which a background thread "
                "cannot do. Use a format the main process writes alone (sharded = False), or "
                "unset save_async."
            )

    @contextlib.contextmanager
    def hold(self, run: Run) -> Iterator[None]:
        """Hold the output directory's lock (main process; re-entrant within this run)."""
        if run in _HELD or not run.is_main_process:
            yield
            return
        _HELD[run] = lock.acquire(run.output_dir)
        try:
            yield
        finally:
            _HELD.pop(run).release()

    def write(self, run: Run, snapshot: Snapshot, *, background: bool = False) -> Path:
        """Every rank writes its RNG state (and, for a sharded format, its shards); the main
        process writes the rest. The directory is renamed into place only once every file is
        written, fsynced and in the manifest; then ``latest`` moves, then old ones are rotated
        out. With ``background``, a thread does the main process's writing (``finish`` waits
        for it); what it writes is copied to host memory first."""
        fmt, strategy = run.checkpoint_format, run.strategy
        assert fmt is not None
        root = checkpoints_dir(run)
        final = root / f"step-{snapshot.meta['step']:06d}"
        tmp = final.with_name(f".{final.name}.tmp")
        if run.is_main_process:
            _checked_root(root).mkdir(parents=True, exist_ok=True)
            _recover(root)  # leftovers of an interrupted save; a planted link is unlinked here
            tmp.mkdir()  # never through a link: mkdir fails on any existing name
        strategy.barrier()
        write_json(tmp / f"rng-rank{strategy.rank:05d}.json", snapshot.rng, indent=None)
        if fmt.sharded:  # every rank writes its part of the weights and optimizer state
            _save_sharded(run, fmt, tmp, snapshot.model, snapshot.optimizer)
        contents = None
        if run.is_main_process:
            states = dict(snapshot.states)
            if not fmt.sharded:
                states["optimizer"] = snapshot.optimizer
            meta = {"layout": files.LAYOUT_VERSION, "format": fmt.name, **snapshot.meta}
            # a background write needs its own copy: training goes on changing the tensors
            model_state = None if fmt.sharded else _copied(snapshot.model, background)
            encoded = {stem: files.encoded(value, background) for stem, value in states.items()}
            contents = _Files(fmt, tmp, run.model, model_state, encoded, meta)
        if background:
            strategy.barrier()  # every rank's RNG file is in place before the writer lists them
            writer = _IN_FLIGHT[run] = _Writer(contents, root, final, run.config)
            writer.start()
            return final
        if contents is not None:
            contents.write()
        strategy.barrier()
        if run.is_main_process:
            files.write_manifest(tmp)
            _publish(root, tmp, final)
            _rotate(run.config, root, final)
        strategy.barrier()
        return final

    def finish(self, run: Run) -> Path | None:
        """Wait for the run's background save; a failure on the writing rank raises on all."""
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
        return final

    def existing(self, run: Run, step: int) -> Path | None:
        path = checkpoints_dir(run) / f"step-{step:06d}"
        return path if os.path.lexists(path) else None

    def resume(self, run: Run, source: str) -> Path | None:
        """ "auto": the newest checkpoint that verifies and loads (one that does not is skipped
        with a warning saying why), None when there is none; a path must verify and load."""
        root = checkpoints_dir(run)
        if run.is_main_process:
            _recover(root)
        run.strategy.barrier()

        def restore(path: Path) -> None:
            checkpoint.restore(run, files.read_snapshot(run, path), path)

        if source == "auto":
            return _newest_good(root, restore)
        path = resolve(source)
        problems = files.verify(path)
        if problems:
            raise CheckpointError(f"cannot resume from {path}: {'; '.join(problems)}")
        restore(path)
        return path

    def verify(self, path: Path | str) -> list[str]:
        return files.verify(Path(path))

    def resolve(self, path: Path | str) -> Path:
        return resolve(path)

    def load_weights(self, model: nn.Module, path: Path | str, *, strict: bool, check: bool) -> Any:
        """``treadle.load_weights``: read by the format that the checkpoint's ``state.json``
        names (an export's too); nothing is unpickled."""
        directory = resolve(path)
        if check:
            problems = files.verify(directory)
            if problems:
                raise CheckpointError(
                    f"cannot load weights from {directory}: {'; '.join(problems)}"
                )
        fmt = registry.component(
            "checkpoint", files.read_meta(directory)["format"], CheckpointFormat
        )
        state = fmt.load_model(directory, model) if strict else fmt.load_tensors(directory, "model")
        try:
            return model.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise TreadleError(
                f"cannot load the weights of {directory} into the model: {exc}"
            ) from exc


_IN_FLIGHT: weakref.WeakKeyDictionary[Run, _Writer] = weakref.WeakKeyDictionary()
_HELD: weakref.WeakKeyDictionary[Run, lock.OutputLock] = weakref.WeakKeyDictionary()


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
                files.write_state(self.fmt, self.directory, stem, *encoded)
        write_json(self.directory / STATE, self.meta)


class _Writer(threading.Thread):
    """The background half of a save: write, fsync, publish, rotate; keeps its error."""

    def __init__(self, contents: _Files | None, root: Path, final: Path, config: Config) -> None:
        # not a daemon: an interpreter that exits while a save is in flight finishes it first
        super().__init__(name="treadle-checkpoint-writer")
        self.contents, self.root, self.final, self.config = contents, root, final, config
        self.error: BaseException | None = None

    def run(self) -> None:
        if self.contents is None:
            return  # not the main process: its RNG file is written already
        try:
            self.contents.write()
            files.write_manifest(self.contents.directory)
            _publish(self.root, self.contents.directory, self.final)
            _rotate(self.config, self.root, self.final)
        except BaseException as exc:  # reported on the training thread by finish_pending
            self.error = exc


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
            files.write_text_atomic(root / LATEST, max(others, key=_step_of).name + "\n")
        old = final.with_name(f".{final.name}.old")
        remove_tree(old)
        os.replace(final, old)  # renames a planted link itself, never what it points to
        try:
            os.replace(tmp, final)
        except OSError as exc:
            os.replace(old, final)
            files.write_text_atomic(root / LATEST, final.name + "\n")
            raise CheckpointError(
                f"cannot rename {tmp} to {final} ({exc}); the previous {final.name} is kept "
                "and the new one stays in the hidden directory until the next save"
            ) from exc
        remove_tree(old)
    else:
        os.replace(tmp, final)
    files.fsync_dir(root)
    files.write_text_atomic(root / LATEST, final.name + "\n")
    files.fsync_dir(root)


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
            if not os.path.lexists(final) and not files.verify(path):
                os.replace(path, final)
                warnings.warn(
                    f"{final.name} was hidden as {path.name} by an interrupted save; restored it",
                    TreadleWarning,
                    stacklevel=3,
                )
                continue
        remove_tree(path)
    files.fsync_dir(root)


def write_folder(out: Path, write: Callable[[Path], Any], meta: Mapping[str, Any]) -> Path:
    """Write a folder that treadle verifies and reads as it does a checkpoint (``treadle
    export`` writes one): ``write(directory)`` writes the files into a temporary sibling of
    ``out``; ``meta`` becomes its ``state.json``, a manifest lists every file, and it is
    renamed to ``out`` (an empty directory there is replaced). A failure leaves nothing."""
    tmp = out.with_name(f".{out.name}.tmp")
    remove_tree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        write_json(tmp / STATE, dict(meta))
        files.write_manifest(tmp)
    except BaseException:
        remove_tree(tmp)
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    files.fsync_dir(out.parent)
    return out


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
        encoded = files.encode(optimizer_state, "", tensors, cpu=False)  # the format copies shards
        fmt.save_sharded(directory, "optimizer", tensors)
        if run.is_main_process:
            write_json(directory / "optimizer.json", {"tensors": bool(tensors), "value": encoded})


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
    remove_tree(trash)


def _metric_of(path: Path) -> float | None:
    try:
        metric = files.read_json(path / STATE).get("metric")
    except (OSError, CheckpointError):
        return None  # unreadable: never ranked, so only keep_last decides about it
    return float(metric) if isinstance(metric, int | float) and math.isfinite(metric) else None


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
        problems = files.verify(path)
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


def _check_output_dir(output_dir: str) -> None:
    """An output directory (or a parent of it) that is a file fails every save: say so now."""
    path = Path(output_dir)
    for candidate in (path, *path.parents):
        try:
            if candidate.exists() and not candidate.is_dir():
                raise ConfigError(
                    f"Config.output_dir = {output_dir!r} is not allowed: {candidate} is a file, "
                    "not a directory. Choose another output_dir, or move the file."
                )
        except OSError as exc:  # a name too long, a permission denied on a parent
            raise ConfigError(
                f"Config.output_dir = {output_dir!r} is not allowed: {exc.strerror or exc}"
            ) from None
