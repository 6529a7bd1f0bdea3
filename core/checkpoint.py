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
import json
import math
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from treadle import registry
from treadle.components import CheckpointFormat
from treadle.data import ResumableSampler
from treadle.errors import TreadleError, TreadleWarning

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = [
    "export",
    "find_resumable",
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


def save(run: Run) -> Path:
    """Write a complete checkpoint of the run's current step; returns its directory.

    Every rank writes its RNG state; the main process writes everything else (the strategy
    gathers what it must first). The directory is renamed into place only once every file is
    written, fsynced and in the manifest; then ``latest`` moves, then old ones are rotated out.
    """
    fmt, strategy, state = run.checkpoint_format, run.strategy, run.state
    if fmt is None:
        raise TreadleError("this run has checkpoint=None; name a checkpoint format to save")
    run.fold_tokens()
    root = checkpoints_dir(run)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".step-{state.step:06d}.tmp"
    if run.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
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
    if run.is_main_process:
        if not sharded:
            fmt.save_model(tmp, run.model, model_state)
            if optimizer_state is not None:
                _save_state(fmt, tmp, "optimizer", optimizer_state)
        if run.scheduler is not None:
            _save_state(fmt, tmp, "scheduler", run.scheduler.state_dict())
        _save_state(fmt, tmp, "precision", run.precision.state_dict())
        _save_state(fmt, tmp, "plugins", plugin_state)
        _write_json(tmp / STATE, _meta(run, fmt))
    strategy.barrier()
    if run.is_main_process:
        _write_manifest(tmp)
        if final.exists():  # saving the same step again: replace it only once the new one is whole
            stale = root / f".step-{state.step:06d}.old"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, final.name + "\n")
        _fsync_dir(root)
        _rotate(run, root, final)
    strategy.barrier()
    run.last_checkpoint = final
    run._last_save_step = state.step
    run.emit("on_save_end", run=run, path=final)
    return final


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
    }


def _rotate(run: Run, root: Path, newest: Path) -> None:
    """Delete checkpoints beyond the ``keep_last`` newest, sparing the ``keep_best`` best.

    Runs only after ``newest`` is complete and ``latest`` names it. Checkpoints with a higher
    step than ``newest`` (left by another line of this run, e.g. after resuming from an older
    path) are neither counted nor deleted: they are not this line's to judge.
    """
    config = run.config
    for path in root.iterdir():
        # Temporary directories of saves that crashed; nothing else writes here now.
        if path.is_dir() and _TEMP_DIR.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
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
    shutil.rmtree(trash)


def _metric_of(path: Path) -> float | None:
    try:
        metric = _read_json(path / STATE).get("metric")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: never ranked, so only keep_last decides about it
    return float(metric) if isinstance(metric, int | float) and math.isfinite(metric) else None


# ------------------------------------------------------------------ verify and find


def verify(path: Path) -> list[str]:
    """Problems with the checkpoint at ``path``: each names a missing, truncated or altered file.

    Every file listed in ``manifest.json`` is checked for its size, then its SHA-256. An empty
    list means the checkpoint is exactly as it was written.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        files = _read_json(manifest_path)["files"]
        entries = [(str(name), int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [f"{manifest_path}: missing or unreadable manifest ({exc})"]
    if STATE not in files:
        return [f"{manifest_path}: does not list {STATE}"]
    problems = []
    for name, size, digest in entries:
        file = path / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != size:
            problems.append(
                f"{file}: truncated or extended ({file.stat().st_size} bytes, {size} expected)"
            )
        elif _sha256(file) != digest:
            problems.append(f"{file}: altered (SHA-256 differs from the manifest)")
    return problems


def find_resumable(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; damaged ones are skipped with a warning.

    Raises:
        TreadleError: there are checkpoints, but none of them verifies.
    """
    candidates = sorted(_step_dirs(Path(root)), key=_step_of, reverse=True)
    for path in candidates:
        problems = verify(path)
        if not problems:
            return path
        warnings.warn(
            f"skipping damaged checkpoint {path}: {'; '.join(problems)}; trying the previous one",
            TreadleWarning,
            stacklevel=2,
        )
    if candidates:
        # Starting over would silently throw away the run: a person should decide.
        raise TreadleError(
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
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]


def _step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


# ------------------------------------------------------------------ load


def resume(run: Run) -> None:
    """Apply ``Config.resume``: "auto" (newest valid checkpoint, or a fresh start) or a path.

    With "auto", a damaged checkpoint is skipped with a warning naming the bad file, in
    favour of the previous one. An explicit path to one checkpoint must verify.
    """
    spec = run.config.resume
    if spec == "auto":
        path = find_resumable(checkpoints_dir(run))
        if path is None:
            run._resumed = True
            return
    else:
        path = resolve(str(spec))
        problems = verify(path)
        if problems:
            raise TreadleError(f"cannot resume from {path}: {'; '.join(problems)}")
    load(run, path)


def load(run: Run, path: Path) -> None:
    """Restore weights, optimizer, scheduler, precision, RNG, state and plugins' state."""
    fmt, strategy = run.checkpoint_format, run.strategy
    assert fmt is not None
    meta = _read_json(path / STATE)
    if meta.get("weights_only"):
        raise TreadleError(
            f"{path} holds weights only (an export), not training state; resume from a "
            "checkpoint directory, or load these weights with treadle.load_weights(model, path)"
        )
    if meta["format"] != fmt.name:
        raise TreadleError(
            f"checkpoint {path} was written by format {meta['format']!r}, but this run uses "
            f"{fmt.name!r}; pass checkpoint={meta['format']!r}"
        )
    _check_data_position(run, path, meta.get("data") or {})
    if fmt.sharded:
        _load_sharded(run, fmt, path)
    else:
        strategy.load_model_state_dict(run.wrapped_model, fmt.load_model(path, run.model))
        if run.optimizer is not None and (path / "optimizer.json").exists():
            strategy.load_optimizer_state_dict(run.optimizer, _load_state(fmt, path, "optimizer"))
    if run.scheduler is not None and (path / "scheduler.json").exists():
        run.scheduler.load_state_dict(_load_state(fmt, path, "scheduler"))
    run.precision.load_state_dict(_load_state(fmt, path, "precision"))
    for key, value in meta["state"].items():
        setattr(run.state, key, value)
    run.state.stop_reason = None  # why the saving process stopped; this one has not
    rng = path / f"rng-rank{strategy.rank:05d}.json"
    if not rng.exists():
        warnings.warn(
            f"{path} has no RNG state for rank {strategy.rank} (it was written by "
            f"{meta.get('world_size')} ranks); using rank 0's, so random streams will not "
            "continue exactly",
            TreadleWarning,
            stacklevel=2,
        )
        rng = path / "rng-rank00000.json"
    _set_rng_state(_read_json(rng), run.device)
    run.emit("on_load_checkpoint", run=run, plugin_state=_load_state(fmt, path, "plugins"))
    run.last_checkpoint = path
    run._last_save_step = run.state.step
    run._resumed = True


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
            raise TreadleError(f"cannot load weights from {directory}: {'; '.join(problems)}")
    fmt = _format_of(directory)
    state = fmt.load_model(directory, model) if strict else fmt.load_tensors(directory, "model")
    try:
        return model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise TreadleError(f"cannot load the weights of {directory} into the model: {exc}") from exc


def export(source: Path | str, out: Path | str, format: str = "safetensors") -> Path:
    """Write the weights of a checkpoint as a weights-only folder (``treadle export``).

    The folder holds the model files of ``format`` (for "safetensors": ``model.safetensors``
    or shards with an index, the Hugging Face layout), a ``state.json`` naming the format and
    the step, and a ``manifest.json``; it is written under a temporary name and renamed, like
    a checkpoint. ``treadle.load_weights`` reads it.

    Args:
        source: a checkpoint directory, a directory of checkpoints or a run's output directory.
        out: the folder to create; it must not exist yet (an empty directory is replaced).
        format: the checkpoint format to write, by its ``treadle.checkpoint`` entry-point name.

    Returns:
        ``out``.
    """
    directory, out = resolve(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TreadleError(f"{out} already exists; choose a new folder for the export")
    problems = verify(directory)
    if problems:
        raise TreadleError(f"cannot export {directory}: {'; '.join(problems)}")
    reader, writer = _format_of(directory), _format_named(format)
    tensors = reader.load_tensors(directory, "model")
    meta = _read_json(directory / STATE)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # An empty module: tied tensors are recognised by shared storage, not by declared names.
    writer.save_model(tmp, nn.Module(), tensors)
    _write_json(
        tmp / STATE,
        {
            "layout": LAYOUT_VERSION,
            "format": writer.name,
            "weights_only": True,
            "step": meta.get("step", meta.get("state", {}).get("step")),
            "source": str(directory.resolve()),
        },
    )
    _write_manifest(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    return out


def _format_of(directory: Path) -> CheckpointFormat:
    try:
        name = _read_json(directory / STATE)["format"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TreadleError(
            f"{directory}/{STATE} does not name the checkpoint format ({exc})"
        ) from exc
    return _format_named(str(name))


def _format_named(name: str) -> CheckpointFormat:
    fmt = registry.load("checkpoint", name)()
    if not isinstance(fmt, CheckpointFormat):
        raise TreadleError(f"checkpoint format {name!r} is not a treadle.CheckpointFormat")
    return fmt


# ------------------------------------------------------------------ state as JSON + tensors


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor], *, cpu: bool = True) -> Any:
    """JSON-able structure; tensors go to ``tensors`` (on CPU if ``cpu``) and are referenced by key."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous() if cpu else obj.detach()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {
                k: _encode(v, f"{key}.{k}" if key else k, tensors, cpu=cpu) for k, v in obj.items()
            }
        return {
            "__items__": [[k, _encode(v, f"{key}.{k}", tensors, cpu=cpu)] for k, v in obj.items()]
        }
    if isinstance(obj, tuple):
        return {
            "__tuple__": [_encode(v, f"{key}.{i}", tensors, cpu=cpu) for i, v in enumerate(obj)]
        }
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors, cpu=cpu) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise TreadleError(
        f"cannot store {type(obj).__name__} at {key!r} in a checkpoint: only tensors, numbers, "
        "strings, lists, tuples and dicts are stored (nothing is pickled)"
    )


def _save_state(fmt: CheckpointFormat, directory: Path, stem: str, obj: Any) -> None:
    """``{stem}.json``, with any tensors in it written by the format under the same stem."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(obj, "", tensors)
    if tensors:
        fmt.save_tensors(directory, stem, tensors)
    _write_json(directory / f"{stem}.json", {"tensors": bool(tensors), "value": encoded})


def _load_state(fmt: CheckpointFormat, directory: Path, stem: str) -> Any:
    stored = _read_json(directory / f"{stem}.json")
    tensors = fmt.load_tensors(directory, stem) if stored["tensors"] else {}
    return _decode(stored["value"], tensors)


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


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(_unhex(state["torch"]))
    module = getattr(torch, device.type, None) if device.type != "cpu" else None
    if "device" in state and module is not None and hasattr(module, "set_rng_state"):
        module.set_rng_state(_unhex(state["device"]), device)


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


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_manifest(directory: Path) -> None:
    """List every file with its size and SHA-256, after making each file and folder durable."""
    files = {}
    for file in sorted(directory.rglob("*")):
        if file.is_dir():
            _fsync_dir(file)
            continue
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
        files[file.relative_to(directory).as_posix()] = {
            "size": file.stat().st_size,
            "sha256": _sha256(file),
        }
    _write_text_atomic(directory / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")
    _fsync_dir(directory)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
