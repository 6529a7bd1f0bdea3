"""The files of a checkpoint directory: the manifest that proves it whole, JSON state with its
tensors in the format's files, and reading it all back, checked, into a ``Snapshot``.

Every file is listed in ``manifest.json`` with its size and SHA-256 and made durable before the
directory is published; ``verify`` checks that list without following a link or opening
anything but regular files. State is stored as JSON plus tensors (written by the run's
``CheckpointFormat``): nothing is pickled. A file read back is checked field by field, so a
damaged checkpoint fails with a ``CheckpointError`` naming the file and the field, before the
run changes. The layout is documented in ``docs/checkpoints.md``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import stat
import typing
import warnings
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

from treadle import checkpoint
from treadle.checkpoint import Snapshot
from treadle.components import CheckpointFormat
from treadle.data import ResumableSampler
from treadle.errors import CheckpointError, TreadleError, TreadleWarning
from treadle.state import State

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = [
    "LAYOUT_VERSION", "MANIFEST", "STATE", "encode", "read_json", "read_meta", "read_snapshot",
    "remove_tree", "verify", "write_json", "write_manifest", "write_state", "write_text_atomic",
]  # fmt: skip

MANIFEST = "manifest.json"
STATE = "state.json"
#: Version of the directory layout, written to ``state.json``.
LAYOUT_VERSION = 1


# ------------------------------------------------------------------ reading a checkpoint back


def read_snapshot(run: Run, path: Path) -> Snapshot:
    """This rank's part of the checkpoint at ``path``, every piece read and checked against the
    run; nothing in the run changes (``treadle.checkpoint.restore`` applies it).

    Raises:
        CheckpointError: a file or field is missing or not what this run can take; the message
            names the file and the field.
    """
    fmt, strategy = run.checkpoint_format, run.strategy
    assert fmt is not None
    meta = read_meta(path)
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
    meta["state"] = _checked_state(path / STATE, meta["state"])
    rng = _read_rng(path, strategy.rank, meta.get("world_size"), run.device)
    model = optimizer = None
    states: dict[str, Any] = {}
    if not fmt.sharded:
        model = fmt.load_model(path, run.model)
        if run.optimizer is not None and (path / "optimizer.json").exists():
            optimizer = _load_state(fmt, path, "optimizer")
            _check_optimizer_state(path / "optimizer.json", optimizer, run.optimizer)
    if run.scheduler is not None and (path / "scheduler.json").exists():
        states["scheduler"] = _load_state(fmt, path, "scheduler")
        reference = run.scheduler.state_dict()
        _check_like(path / "scheduler.json", states["scheduler"], reference, "value")
    states["precision"] = _load_state(fmt, path, "precision")
    states["plugins"] = _load_state(fmt, path, "plugins")
    if not isinstance(states["plugins"], dict):
        raise CheckpointError(f"{path / 'plugins.json'}: field 'value' must be an object")
    _check_data_position(run, path, meta.get("data") or {})
    shards = functools.partial(_load_sharded, run, fmt, path) if fmt.sharded else None
    return Snapshot(meta, rng, model, optimizer, states, shards)


def _check_data_position(run: Run, path: Path, data: Mapping[str, Any]) -> None:
    """Warn when the data cannot continue where the checkpoint left it."""
    sampler = getattr(run.fit_state.train_loader, "sampler", None)
    saved = data.get("sampler")
    seed = saved.get("seed") if isinstance(saved, Mapping) else None
    if isinstance(sampler, ResumableSampler) and saved is not None and seed != sampler.seed:
        warnings.warn(
            f"{path} was written with data order seed {seed}, this run uses {sampler.seed}: "
            "the rest of the epoch will see other samples than it would have",
            TreadleWarning,
            stacklevel=4,
        )
    saved_length, length = data.get("batches_per_epoch"), run.fit_state.batches_per_epoch
    if saved_length is not None and saved_length != length:
        warnings.warn(
            f"{path} was written with {saved_length} batches per epoch, this run has {length}: "
            "the training data changed, so the position in the epoch does not mean the same "
            "samples",
            TreadleWarning,
            stacklevel=4,
        )


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


def read_meta(path: Path) -> dict[str, Any]:
    """``state.json`` of the checkpoint at ``path``, every field the kernel reads checked."""
    file = path / STATE
    meta: dict[str, Any] = read_json(file)
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
        return is_int(value)
    return isinstance(value, kind)


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
        stored = read_json(path / "optimizer.json")
        tensors: dict[str, torch.Tensor] = {}
        current = strategy.optimizer_state_dict(run.optimizer, sharded=True)
        encode(current, "", tensors, cpu=False)  # the names and shapes to read
        tensors = fmt.load_sharded(path, "optimizer", tensors) if stored["tensors"] else {}
        state = _decode(stored["value"], tensors)
        strategy.load_optimizer_state_dict(run.optimizer, state, sharded=True)


def _load_state(fmt: CheckpointFormat, directory: Path, stem: str) -> Any:
    file = directory / f"{stem}.json"
    stored = read_json(file)
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


def _read_rng(path: Path, rank: int, world_size: Any, device: torch.device) -> dict[str, Any]:
    """This rank's RNG file (rank 0's, with a warning, if it has none), checked by
    ``treadle.checkpoint.read_rng``, so that a bad one fails before the run changes."""
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
    saved = read_json(file)
    checkpoint.read_rng(saved, device, str(file))
    return saved


# ------------------------------------------------------------------ the manifest and verification


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
    files = read_json(manifest).get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest}: field 'files' must be an object, got {files!r:.80}")
    entries = []
    for name, entry in files.items():
        _checked_name(path, name, manifest)
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not is_int(size) or size < 0:
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


def encode(
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
        return encode(value, at, tensors, cpu=cpu, copy=copy)

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


def encoded(obj: Any, copy: bool = False) -> tuple[Any, dict[str, torch.Tensor]] | None:
    """``obj`` as JSON-able structure plus its tensors (owned copies with ``copy``); None: None."""
    if obj is None:
        return None
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode(obj, "", tensors, copy=copy)
    return encoded, tensors


def write_state(
    fmt: CheckpointFormat,
    directory: Path,
    stem: str,
    encoded: Any,
    tensors: dict[str, torch.Tensor],
) -> None:
    """``{stem}.json``, with any tensors in it written by the format under the same stem."""
    if tensors:
        fmt.save_tensors(directory, stem, tensors)
    write_json(directory / f"{stem}.json", {"tensors": bool(tensors), "value": encoded})


def write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    """A file inside a temporary checkpoint directory: ``write_manifest`` makes it durable."""
    path.write_text(json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file; anything else is a ``CheckpointError`` naming it."""
    with open_regular(path) as handle:
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


def open_regular(path: Path) -> typing.BinaryIO:
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


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if os.path.lexists(tmp):
        tmp.unlink()  # a leftover, or a planted link: never written through
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_manifest(directory: Path) -> None:
    """List every file with its size and SHA-256, after making each file and folder durable."""
    files = {}
    for name in sorted(_regular_files(directory).keys() - {MANIFEST}):
        file = directory / name
        with open_regular(file) as handle:
            os.fsync(handle.fileno())
        files[name] = {"size": file.stat().st_size, "sha256": _sha256(file)}
    for folder in {parent for name in files for parent in (directory / name).parents}:
        if directory in folder.parents:  # the sub-directories; ``directory`` itself below
            fsync_dir(folder)
    write_text_atomic(directory / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")
    fsync_dir(directory)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_int(value: Any) -> typing.TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def remove_tree(path: Path) -> None:
    """Delete ``path`` whatever it is; a link is unlinked, never followed."""
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)  # rmtree does not follow links inside the tree
