"""Resuming a run from a checkpoint: every piece read and checked before the run changes.

``resume`` applies ``Config.resume``; ``load`` restores weights, optimizer, scheduler,
precision, random streams, counters and plugins' state from one checkpoint directory written
by ``treadle.checkpoint``; ``load_weights`` fills a model for inference. Everything loads
from JSON or from the format's tensor files: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import random
import typing
import warnings
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs
import numpy as np
import torch
from torch import nn

from treadle import checkpoint, registry
from treadle.components import CheckpointFormat
from treadle.data import ResumableSampler
from treadle.errors import CheckpointError, TreadleError, TreadleWarning
from treadle.state import State

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["load", "load_weights", "read_meta", "resume", "rng_preserved"]


def resume(run: Run) -> None:
    """Apply ``Config.resume``: "auto" (newest valid checkpoint, or a fresh start) or a path.

    With "auto", a checkpoint that does not verify or does not load is skipped with a warning
    saying why, in favour of the previous one. An explicit path must verify and load.
    """
    root = checkpoint.checkpoints_dir(run)
    if run.is_main_process:
        checkpoint._recover(root)
    run.strategy.barrier()
    spec = run.config.resume
    if spec != "auto":
        path = checkpoint.resolve(str(spec))
        problems = checkpoint.verify(path)
        if problems:
            raise CheckpointError(f"cannot resume from {path}: {'; '.join(problems)}")
        load(run, path)
        return
    if checkpoint._newest_good(root, lambda path: load(run, path)) is None:
        run.fit_state.resumed = True


def load(run: Run, path: Path) -> None:
    """Restore weights, optimizer, scheduler, precision, RNG, state and plugins' state.

    Everything is read and checked before anything in the run changes, so a damaged
    checkpoint (even one with a consistent manifest) fails with a ``CheckpointError`` naming
    the file and the field and leaves the run as it was.
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
        raise CheckpointError(f"{path / checkpoint.STATE}: field 'state' is missing")
    if meta["format"] != fmt.name:
        raise TreadleError(
            f"checkpoint {path} was written by format {meta['format']!r}, but this run uses "
            f"{fmt.name!r}; pass checkpoint={meta['format']!r}"
        )
    state = _checked_state(path / checkpoint.STATE, meta["state"])
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
    run.fit_state.resumed_stop = run.state.stop_reason = meta.get("stopped")
    _set_rng_state(rng, run.device)
    run.resumed_from = path
    run.emit("on_load_checkpoint", run=run, plugin_state=plugin_state)
    run.last_checkpoint = path
    run.fit_state.last_save_step = run.state.step
    run.fit_state.resumed = True


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


def read_meta(path: Path) -> dict[str, Any]:
    """``state.json`` of the checkpoint at ``path``, every field the kernel reads checked."""
    file = path / checkpoint.STATE
    meta: dict[str, Any] = checkpoint._read_json(file)
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
        return checkpoint._is_int(value)
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
        stored = checkpoint._read_json(path / "optimizer.json")
        tensors: dict[str, torch.Tensor] = {}
        current = strategy.optimizer_state_dict(run.optimizer, sharded=True)
        checkpoint._encode(current, "", tensors, cpu=False)  # the names and shapes to read
        tensors = fmt.load_sharded(path, "optimizer", tensors) if stored["tensors"] else {}
        state = _decode(stored["value"], tensors)
        strategy.load_optimizer_state_dict(run.optimizer, state, sharded=True)


def _check_data_position(run: Run, path: Path, data: Mapping[str, Any]) -> None:
    """Warn when the data cannot continue where the checkpoint left it."""
    sampler = getattr(run.fit_state.train_loader, "sampler", None)
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
    if saved_length is not None and saved_length != run.fit_state.batches_per_epoch:
        warnings.warn(
            f"{path} was written with {saved_length} batches per epoch, this run has "
            f"{run.fit_state.batches_per_epoch}: the training data changed, so the position in the "
            "epoch does not mean the same samples",
            TreadleWarning,
            stacklevel=3,
        )


def _load_state(fmt: CheckpointFormat, directory: Path, stem: str) -> Any:
    file = directory / f"{stem}.json"
    stored = checkpoint._read_json(file)
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


# ------------------------------------------------------------------ random streams


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
    saved = checkpoint._read_json(file)
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
        module = checkpoint._device_rng(device)
        if (
            device_state is not None
            and module is not None
            and device_state.numel() != module.get_rng_state(device).numel()
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
    module = checkpoint._device_rng(device)
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
    module = checkpoint._device_rng(device)
    device_state = module.get_rng_state(device) if module is not None else None
    numpy_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    saved = _RngState(random.getstate(), numpy_state, torch.get_rng_state(), device_state)
    try:
        yield
    finally:
        _set_rng_state(saved, device)


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
    directory = checkpoint.resolve(path)
    if check:
        problems = checkpoint.verify(directory)
        if problems:
            raise CheckpointError(f"cannot load weights from {directory}: {'; '.join(problems)}")
    fmt = registry.component("checkpoint", read_meta(directory)["format"], CheckpointFormat)
    state = fmt.load_model(directory, model) if strict else fmt.load_tensors(directory, "model")
    try:
        return model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise TreadleError(f"cannot load the weights of {directory} into the model: {exc}") from exc
