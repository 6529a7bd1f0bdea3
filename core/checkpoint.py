"""What a checkpoint holds, and when it is taken and restored; where it goes is the store's.

The kernel captures a run's state into a ``Snapshot`` (on every rank: each has its own random
streams, and a sharded format writes each rank's shards) and hands it to the run's
``CheckpointStore``, which makes it durable; the store's ``CheckpointFormat`` writes the
tensors. Resuming, the store finds a checkpoint, reads and checks it against the run, and
gives it back to ``restore``. The first-party store, ``directory``, is the protocol of
``docs/checkpoints.md``: temporary directory, fsync, manifest, rename, ``latest``.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from treadle import registry
from treadle.components import DEFAULT_STORE, CheckpointStore
from treadle.data import ResumableSampler
from treadle.errors import CheckpointError, TreadleError

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = [
    "Snapshot", "capture", "finish_pending", "load_weights", "read_rng", "resolve", "restore",
    "resume", "rng_preserved", "rng_state", "save", "verify",
]  # fmt: skip


class Snapshot(NamedTuple):
    """A checkpoint's content, as ``capture`` takes it for a store and a store gives it back.

    ``meta``: counters (``meta["state"]`` is ``State.to_dict()``), the data position, why the
    run stopped: JSON values, on every rank. ``rng``: this rank's random streams
    (``rng_state()``). ``model``, ``optimizer``: the full state dicts on the main process, or
    this rank's shards for a sharded format. ``states``: ``scheduler``, ``precision`` and
    ``plugins`` (nested values holding tensors), main process only. Read back for a sharded
    format, ``model`` is None and ``load_shards()`` reads the shards into the run in place.
    """

    meta: dict[str, Any]
    rng: dict[str, Any]
    model: Mapping[str, torch.Tensor] | None
    optimizer: Any
    states: dict[str, Any]
    load_shards: Callable[[], None] | None = None


def save(run: Run, *, background: bool = False) -> Path:
    """Write a checkpoint of the run's current step through its store; returns where it went.

    With ``background`` (``Config.save_async``), the step waits only while the store copies
    the state to host memory, and the save is complete when ``finish_pending`` returns (called
    by the next save and at the end of ``fit``). At most one save is in flight.
    """
    finish_pending(run)
    if run.checkpoint_format is None:
        raise TreadleError("this run has checkpoint=None; name a checkpoint format to save")
    run.fold_tokens()
    snapshot = capture(run)
    run.fit_state.last_save_step = run.state.step
    path = run.checkpoint_store.write(run, snapshot, background=background)
    if not background:
        _saved(run, path)
    return path


def finish_pending(run: Run) -> Path | None:
    """Wait for the run's background save, if one is in flight; returns where it went.

    Every rank calls it at the same points (before a save, at the end of ``fit``), so a
    failure on the writing rank raises on all of them.
    """
    path = run.checkpoint_store.finish(run)
    if path is not None:
        _saved(run, path)
    return path


def _saved(run: Run, path: Path) -> None:
    run.last_checkpoint = path
    run.emit("on_save_end", run=run, path=path)


def capture(run: Run) -> Snapshot:
    """The run's state now, on every rank; plugins add theirs in ``on_save_checkpoint``."""
    strategy, state, fit_state, config = run.strategy, run.state, run.fit_state, run.config
    rng = rng_state(run.device)
    plugin_state: dict[str, Any] = {}
    run.emit("on_save_checkpoint", run=run, plugin_state=plugin_state)
    sharded = run.checkpoint_format is not None and run.checkpoint_format.sharded
    model = strategy.model_state_dict(run.wrapped_model, sharded=sharded)
    optimizer = (
        strategy.optimizer_state_dict(run.optimizer, sharded=sharded) if run.optimizer else None
    )
    states = {}
    if run.is_main_process:
        scheduler = run.scheduler.state_dict() if run.scheduler is not None else None
        states = {"scheduler": scheduler, "precision": run.precision.state_dict()}
        states["plugins"] = plugin_state
    # A checkpoint is ranked by the monitored metric only if it was logged at this very step:
    # an older value would describe other weights.
    metric = state.last_metrics.get(config.monitor) if config.monitor else None
    if fit_state.monitor_step != state.step or not isinstance(metric, int | float):
        metric = None
    sampler = getattr(fit_state.train_loader, "sampler", None)
    meta = {
        "step": state.step,
        "state": state.to_dict(),
        "data": {
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "batches_per_epoch": fit_state.batches_per_epoch,
            "sampler": sampler.state_dict() if isinstance(sampler, ResumableSampler) else None,
        },
        "world_size": strategy.world_size,
        "monitor": config.monitor,
        "monitor_mode": config.monitor_mode,
        "metric": float(metric) if metric is not None and math.isfinite(metric) else None,
        # a final stop at this step (resuming trains no further; not a preemption, not a
        # limit: a larger max_steps trains on), and why an emergency checkpoint was written
        "stopped": fit_state.final_stop if fit_state.stopping else None,
        "emergency": fit_state.emergency,
    }
    return Snapshot(meta, rng, model, optimizer, states)


def resume(run: Run) -> None:
    """Apply ``Config.resume`` through the store: "auto" (the newest checkpoint that loads, or
    a fresh start) or a path, which must load."""
    if run.checkpoint_store.resume(run, str(run.config.resume)) is None:
        run.fit_state.resumed = True  # a fresh start: a later fit does not look again


def restore(run: Run, snapshot: Snapshot, path: Path) -> None:
    """Apply a snapshot that the store read from ``path`` and checked against the run: weights,
    optimizer, scheduler, precision, random streams, counters and plugins' state."""
    meta, states = snapshot.meta, snapshot.states
    rng = read_rng(snapshot.rng, run.device, str(path))
    with _applying(path):
        if states.get("scheduler") is not None and run.scheduler is not None:
            run.scheduler.load_state_dict(states["scheduler"])
        if snapshot.optimizer is not None and run.optimizer is not None:
            run.strategy.load_optimizer_state_dict(run.optimizer, snapshot.optimizer)
        if snapshot.load_shards is not None:
            snapshot.load_shards()
        else:
            assert snapshot.model is not None
            run.strategy.load_model_state_dict(run.wrapped_model, snapshot.model)
        run.precision.load_state_dict(states["precision"])
    for key, value in meta["state"].items():
        setattr(run.state, key, value)
    # Why the saving process stopped is not this one's reason, unless the stop was final (an
    # early stop): then the run stays stopped (loop.fit returns at once) until run.clear_stop().
    run.fit_state.resumed_stop = run.state.stop_reason = meta.get("stopped")
    _set_rng_state(rng, run.device)
    run.resumed_from = path
    run.emit("on_load_checkpoint", run=run, plugin_state=states["plugins"])
    run.last_checkpoint = path
    run.fit_state.last_save_step = run.state.step
    run.fit_state.resumed = True


# ------------------------------------------------------------------ the default store's reach


def _default_store() -> CheckpointStore:
    store: CheckpointStore = registry.component("store", DEFAULT_STORE, CheckpointStore)
    return store


def verify(path: Path | str) -> list[str]:
    """Problems with the checkpoint at ``path`` (the ``directory`` store's): each names a
    missing, truncated or altered file; an empty list means it is exactly as it was written."""
    return _default_store().verify(path)


def resolve(path: Path | str) -> Path:
    """The checkpoint that ``path`` names: a checkpoint directory, a directory of them or a
    run's output directory (the newest valid one in either).

    Raises:
        TreadleError: nothing there is a checkpoint, or every checkpoint there is damaged.
    """
    return _default_store().resolve(path)


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
    return _default_store().load_weights(model, path, strict=strict, check=check)


@contextlib.contextmanager
def _applying(path: Path) -> Iterator[None]:
    """Name the checkpoint when torch refuses a state the store's checks let through."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        raise CheckpointError(
            f"cannot restore {path}: {type(exc).__name__}: {exc}; the run may be partly "
            "restored, so start it again (resume='auto' then tries the previous checkpoint)"
        ) from exc


# ------------------------------------------------------------------ random streams


class _RngState(NamedTuple):
    """One rank's random streams, checked, ready to set."""

    python: tuple[Any, ...]
    numpy: tuple[Any, ...]
    torch: torch.Tensor
    device: torch.Tensor | None


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random stream of this process (python, numpy, torch, ``device``) as JSON values."""
    python_state = random.getstate()
    numpy_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    plain = [value.item() if hasattr(value, "item") else value for value in numpy_state[2:]]
    state: dict[str, Any] = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *plain],
        "torch": _hex(torch.get_rng_state()),
    }
    module = _device_rng(device)
    if module is not None:
        state["device"] = _hex(module.get_rng_state(device))
    return state


def read_rng(saved: Mapping[str, Any], device: torch.device, source: str) -> _RngState:
    """``rng_state()``'s values back, checked by setting each on a scratch generator, so that a
    bad one fails (a ``CheckpointError`` naming ``source`` and the field) before the run
    changes."""
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
        module = _device_rng(device)
        size = module.get_rng_state(device).numel() if module is not None else None
        if device_state is not None and size is not None and device_state.numel() != size:
            raise ValueError(f"{device_state.numel()} bytes, not {device.type}'s")
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError, IndexError) as exc:
        missing = isinstance(exc, KeyError)
        raise CheckpointError(
            f"{source}: field {field!r} is {'missing' if missing else 'not a valid state'}"
            + ("" if missing else f" ({type(exc).__name__}: {str(exc)[:200]})")
        ) from exc
    return _RngState(python, numpy, torch_state, device_state)


def _set_rng_state(state: _RngState, device: torch.device) -> None:
    random.setstate(state.python)
    np.random.set_state(state.numpy)
    torch.set_rng_state(state.torch)
    module = _device_rng(device)
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
    module = _device_rng(device)
    device_state = module.get_rng_state(device) if module is not None else None
    numpy_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    saved = _RngState(random.getstate(), numpy_state, torch.get_rng_state(), device_state)
    try:
        yield
    finally:
        _set_rng_state(saved, device)


def _device_rng(device: torch.device) -> Any:
    """The torch module with ``device``'s generator (``torch.cuda``, ...); None for the CPU."""
    module = getattr(torch, device.type, None) if device.type != "cpu" else None
    return module if hasattr(module, "get_rng_state") else None


def _hex(state: torch.Tensor) -> str:
    """A generator's byte state as a hex string (compact, exact, still plain JSON)."""
    return bytes(state.cpu().numpy().tobytes()).hex()


def _unhex(text: str | list[int]) -> torch.Tensor:
    data = bytes(text) if isinstance(text, list) else bytes.fromhex(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
