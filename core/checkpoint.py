"""Checkpoint directories that are never half-written: save, verify, rotate, resume.

The directory protocol is the kernel's; the files for tensors are the checkpoint format's. A
checkpoint is written under a temporary name, every file is fsynced and listed with its size
and SHA-256 in ``manifest.json``, the directory is renamed into place, and only then does
``latest`` move. A crash at any instant leaves the previous checkpoint whole. Everything loads
from JSON or from the format's tensor files: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from treadle.errors import TreadleError, TreadleWarning

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["find_resumable", "load", "resume", "save", "verify"]

MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run: Run) -> Path:
    return run.output_dir / "checkpoints"


# ------------------------------------------------------------------ save


def save(run: Run) -> Path:
    """Write a complete checkpoint of the run's current step; returns its directory."""
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
    _write_json(tmp / f"rng-rank{strategy.rank:05d}.json", _rng_state(run.device))
    plugin_state: dict[str, Any] = {}
    run.emit("on_save_checkpoint", run=run, plugin_state=plugin_state)
    model_state = strategy.model_state_dict(run.wrapped_model)
    optimizer_state = strategy.optimizer_state_dict(run.optimizer) if run.optimizer else None
    if run.is_main_process:
        fmt.save_model(tmp, run.model, model_state)
        if optimizer_state is not None:
            tensors: dict[str, torch.Tensor] = {}
            _write_json(tmp / "optimizer.json", _encode(optimizer_state, "", tensors))
            fmt.save_tensors(tmp, "optimizer", tensors)
        if run.scheduler is not None:
            _write_json(tmp / "scheduler.json", _encode(run.scheduler.state_dict(), "", {}))
        _write_json(tmp / "precision.json", _encode(run.precision.state_dict(), "", {}))
        _write_json(tmp / "plugins.json", plugin_state)
        metric = state.last_metrics.get(run.config.monitor) if run.config.monitor else None
        _write_json(
            tmp / "state.json",
            {
                "state": state.to_dict(),
                "format": fmt.name,
                "world_size": strategy.world_size,
                "monitor": run.config.monitor,
                "metric": metric,
            },
        )
    strategy.barrier()
    if run.is_main_process:
        _write_manifest(tmp)
        if final.exists():  # saving the same step again: replace it only once the new one is whole
            stale = root / f".step-{state.step:06d}.old"
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, final.name + "\n")
        _rotate(run, root)
    strategy.barrier()
    run.last_checkpoint = final
    run._last_save_step = state.step
    run.emit("on_save_end", run=run, path=final)
    return final


def _rotate(run: Run, root: Path) -> None:
    """Delete checkpoints beyond ``keep_last`` newest, sparing the ``keep_best`` best ones."""
    config = run.config
    if config.keep_last is None:
        return
    complete = sorted(_step_dirs(root), key=_step_of)
    keep = set(complete[-config.keep_last :])
    if config.keep_best:
        scored = []
        for path in complete:
            metric = _read_json(path / "state.json").get("metric")
            if metric is not None:
                scored.append((metric, _step_of(path), path))
        scored.sort(
            key=lambda item: (item[0] if config.monitor_mode == "min" else -item[0], item[1])
        )
        keep.update(path for _, _, path in scored[: config.keep_best])
    for path in complete:
        if path not in keep:
            shutil.rmtree(path)


# ------------------------------------------------------------------ verify and find


def verify(path: Path) -> list[str]:
    """Problems with the checkpoint at ``path`` (missing, truncated or altered files)."""
    manifest_path = path / MANIFEST
    try:
        manifest = _read_json(manifest_path)
    except (OSError, ValueError) as exc:
        return [f"{manifest_path}: unreadable manifest ({exc})"]
    problems = []
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != entry["size"]:
            problems.append(f"{file}: size {file.stat().st_size}, expected {entry['size']}")
        elif _sha256(file) != entry["sha256"]:
            problems.append(f"{file}: checksum mismatch (altered)")
    return problems


def find_resumable(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; damaged ones are skipped with a warning."""
    for path in sorted(_step_dirs(root), key=_step_of, reverse=True):
        problems = verify(path)
        if not problems:
            return path
        warnings.warn(
            f"skipping damaged checkpoint {path}: {'; '.join(problems)}; trying the previous one",
            TreadleWarning,
            stacklevel=2,
        )
    return None


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]


def _step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


# ------------------------------------------------------------------ load


def resume(run: Run) -> None:
    """Apply ``Config.resume``: "auto" (newest valid checkpoint, or a fresh start) or a path."""
    spec = run.config.resume
    if spec == "auto":
        path = find_resumable(checkpoints_dir(run))
        if path is None:
            run._resumed = True
            return
    else:
        path = Path(str(spec))
        problems = verify(path)
        if problems:
            raise TreadleError(f"cannot resume from {path}: {'; '.join(problems)}")
    load(run, path)


def load(run: Run, path: Path) -> None:
    """Restore weights, optimizer, scheduler, precision, RNG, state and plugins' state."""
    fmt, strategy = run.checkpoint_format, run.strategy
    assert fmt is not None
    meta = _read_json(path / "state.json")
    if meta["format"] != fmt.name:
        raise TreadleError(
            f"checkpoint {path} was written by format {meta['format']!r}, but this run uses "
            f"{fmt.name!r}; pass checkpoint={meta['format']!r}"
        )
    strategy.load_model_state_dict(run.wrapped_model, fmt.load_model(path, run.model))
    if run.optimizer is not None and (path / "optimizer.json").exists():
        tensors = fmt.load_tensors(path, "optimizer")
        state = _decode(_read_json(path / "optimizer.json"), tensors, run.device)
        strategy.load_optimizer_state_dict(run.optimizer, state)
    if run.scheduler is not None and (path / "scheduler.json").exists():
        run.scheduler.load_state_dict(_decode(_read_json(path / "scheduler.json"), {}, run.device))
    run.precision.load_state_dict(_decode(_read_json(path / "precision.json"), {}, run.device))
    for key, value in meta["state"].items():
        setattr(run.state, key, value)
    rng = path / f"rng-rank{strategy.rank:05d}.json"
    _set_rng_state(_read_json(rng if rng.exists() else path / "rng-rank00000.json"), run.device)
    run.emit("on_load_checkpoint", run=run, plugin_state=_read_json(path / "plugins.json"))
    run.last_checkpoint = path
    run._last_save_step = run.state.step
    run._resumed = True


# ------------------------------------------------------------------ state as JSON + tensors


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able structure; tensors go to ``tensors`` and are referenced by key."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{key}.{k}" if key else k, tensors) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise TreadleError(
        f"cannot store {type(obj).__name__} at {key!r} in a checkpoint: only tensors, numbers, "
        "strings, lists, tuples and dicts are stored (nothing is pickled)"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor], device: torch.device) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _decode(v, tensors, device) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors, device) for v in obj["__tuple__"])
        return {k: _decode(v, tensors, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors, device) for v in obj]
    return obj


def _rng_state(device: torch.device) -> dict[str, Any]:
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *map(_plain, numpy_state[2:])],
        "torch": torch.get_rng_state().tolist(),
    }
    module = getattr(torch, device.type, None) if device.type != "cpu" else None
    if module is not None and hasattr(module, "get_rng_state"):
        state["device"] = module.get_rng_state(device).tolist()
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    module = getattr(torch, device.type, None) if device.type != "cpu" else None
    if "device" in state and module is not None and hasattr(module, "set_rng_state"):
        module.set_rng_state(torch.tensor(state["device"], dtype=torch.uint8), device)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


# ------------------------------------------------------------------ files


def _write_json(path: Path, obj: Any) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


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
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
        files[str(file.relative_to(directory))] = {
            "size": file.stat().st_size,
            "sha256": _sha256(file),
        }
    _write_json(directory / MANIFEST, {"files": files})
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
