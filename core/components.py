"""The small interfaces that component plugins implement.

A strategy, precision, checkpoint format or logger is a class (found through its entry-point
group, or passed as an instance); an optimizer or scheduler is a factory function. Each base
class here already behaves as the simplest reference implementation (one process, full
precision), so a plugin overrides only what it changes. Every component instance is also
registered with the run's plugin manager: a ``@treadle.hookimpl`` method on it listens to hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from treadle.data import ResumableSampler
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.checkpoint import Snapshot
    from treadle.run import Run

__all__ = [
    "DEFAULT_STORE", "CheckpointFormat", "CheckpointStore", "Logger", "OptimizerFactory",
    "Precision", "SchedulerFactory", "Strategy",
]  # fmt: skip


#: ``nullcontext`` holds no state: one instance serves every step
_NO_CONTEXT = contextlib.nullcontext()


class OptimizerFactory(Protocol):
    """``factory(model, **options) -> Optimizer``; entry-point group ``treadle.optimizer``."""

    def __call__(self, model: nn.Module, /, **options: Any) -> Optimizer: ...


class SchedulerFactory(Protocol):
    """``factory(optimizer, total_steps=N, **options) -> scheduler``; group ``treadle.scheduler``.

    The scheduler needs ``step()``, ``state_dict()``, ``load_state_dict()``; it is stepped after
    every optimizer step and may listen to hooks (``reduce-on-plateau`` listens to evaluation).
    """

    def __call__(self, optimizer: Optimizer, /, *, total_steps: int, **options: Any) -> Any: ...


class Precision:
    """Numeric precision: module conversion, autocast, loss scaling. The base is full fp32."""

    name: ClassVar[str] = "fp32"
    device: torch.device = torch.device("cpu")

    def setup(self, device: torch.device) -> None:
        """Called once the strategy chose the device; raise ``ConfigError`` if unsupported."""
        self.device = device

    def convert_module(self, model: nn.Module) -> nn.Module:
        return model

    def convert_input(self, batch: Any) -> Any:
        return batch

    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        return _NO_CONTEXT

    def scale_loss(self, loss: Tensor) -> Tensor:
        return loss

    def unscale_gradients(self, optimizer: Optimizer) -> None:
        """Make ``.grad`` hold true gradients before ``on_before_optimizer_step``."""

    def optimizer_step(self, optimizer: Optimizer) -> bool:
        """Step; return False when the step was skipped (non-finite gradients)."""
        optimizer.step()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class Strategy:
    """Devices, processes, wrapping, backward and step, reductions and state-dict layout.

    The base runs in one process on ``self.device`` and delegates numerics to
    ``self.precision``. A strategy whose engine does its own mixed precision sets
    ``owns_precision``; the run then rejects a separate precision plugin at compose time.
    """

    name: ClassVar[str] = "strategy"
    owns_precision: ClassVar[bool] = False
    precision: Precision
    device: torch.device = torch.device("cpu")
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    # -- life cycle
    def setup(self, run: Run) -> None:
        """Choose the device, start process groups. Called once, at the first ``fit``."""
        self.precision.setup(self.device)

    def teardown(self) -> None:
        """Release process groups and engines. Called when the run is closed."""

    def model_init_context(self) -> contextlib.AbstractContextManager[Any]:
        """Entered around model construction by code that builds models late (meta/ZeRO-3)."""
        return contextlib.nullcontext()

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return self.precision.convert_module(model).to(self.device)

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def wrap_optimizer(self, optimizer: Optimizer) -> Optimizer:
        return optimizer

    def attach_optimizer(self, model: nn.Module, optimizer: Optimizer) -> nn.Module:
        """After ``wrap_optimizer``: the model the loop calls from now on.

        An engine that takes model and optimizer together (DeepSpeed's ``initialize``) is
        built here and returned; the base returns ``model`` (what ``wrap_model`` returned).
        """
        return model

    # -- data
    def train_sampler(
        self, dataset_length: int, *, shuffle: bool, seed: int, drop_last: bool
    ) -> ResumableSampler:
        return ResumableSampler(
            dataset_length,
            shuffle=shuffle,
            seed=seed,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=drop_last,
        )

    def to_device(self, batch: Any) -> Any:
        return move_to_device(self.precision.convert_input(batch), self.device)

    # -- evaluation and prediction (one process: every batch whole, outputs as they are)
    def eval_steps(
        self, loader: Iterable[Any], step: Callable[[Any], Mapping[str, Any]]
    ) -> Iterator[tuple[Any, Mapping[str, Any], bool]]:
        """``(batch, outputs, counted)`` for each batch of the evaluation ``loader``: the batch
        on the device, ``outputs = step(batch)`` (the ``eval_step`` provider), and whether the
        batch's loss counts.

        A strategy whose sampler pads each rank's share of the data (to a multiple of the
        world size) sees each sample once: it cuts the padding rows off a batch before
        ``step``; a batch of padding only still goes through ``step`` (every rank runs as
        many forwards: collectives inside one stay in step), then is yielded with no rows,
        ``outputs["count"] = 0`` and ``counted=False``.
        """
        for batch in loader:
            batch = self.to_device(batch)
            yield batch, step(batch), True

    def gather_outputs(self, loader: Any, outputs: list[Any], rows: int, hook: str) -> list[Any]:
        """Every rank's per-batch ``outputs`` over ``loader``, in the data set's order, batched
        as one process batches it: what ``predict()`` returns and ``compute_metrics`` joins.

        ``rows``: the number of samples this rank's ``outputs`` cover; ``hook``: the hook that
        made them, for messages. Called on every rank at once (a collective where there are
        several). The base, one process, returns ``outputs``.
        """
        return outputs

    # -- the step
    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        return self.precision.forward_context()

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """Context for non-final micro-batches: skip gradient synchronisation."""
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        torch.autograd.backward(self.precision.scale_loss(loss))

    def finalize_gradients(self, optimizer: Optimizer, divisor: Tensor | float) -> None:
        """Unscale, then divide the accumulated gradients by ``divisor``: the number of
        micro-batches (``mean``, a number) or of scored tokens (``tokens``, a device tensor)
        in this rank's window.
        """
        self.precision.unscale_gradients(optimizer)
        self.divide_gradients(optimizer, divisor)

    def divide_gradients(
        self, optimizer: Optimizer, divisor: Tensor | float, *, done: float = 1
    ) -> None:
        """Divide the gradients by ``divisor / done`` (``done``: a division already made, e.g.
        by an engine's own accumulation).
        """
        if isinstance(divisor, Tensor):
            if self.world_size > 1:
                # DDP-style reduction averages gradients over ranks, so divide by the mean of
                # the ranks' token counts: the result is the sum over all tokens / all tokens.
                divisor = self.all_reduce(divisor.detach().clone(), "mean")
            # a window with no scored token has zero gradients; keep them zero, not NaN
            divisor = divisor.clamp_min(1)
        if done != 1:
            divisor = divisor / done
        if not isinstance(divisor, Tensor) and divisor == 1:
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            if isinstance(divisor, Tensor):
                divisor = divisor.to(device=grads[0].device, dtype=grads[0].dtype)
            torch._foreach_div_(grads, divisor)

    def clip_grad_norm(
        self, parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0
    ) -> Tensor:
        return nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type=norm_type)

    def optimizer_step(self, optimizer: Optimizer) -> bool:
        return self.precision.optimizer_step(optimizer)

    def grad_scaler(self, **options: Any) -> torch.amp.GradScaler:
        """The loss scaler a precision plugin uses (``options`` are ``GradScaler``'s).

        Every rank must find an inf/NaN when any rank's gradients hold one, so that all skip
        the step alike. torch's ``GradScaler`` does for whole gradients and for DTensor shards
        (its check is reduced over the mesh); a strategy whose gradient shards are plain
        tensors returns a scaler that reduces the check itself.
        """
        return torch.amp.GradScaler(self.device.type, **options)

    # -- collectives (identity in one process)
    def all_reduce(self, tensor: Tensor, op: str = "mean") -> Tensor:
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    def synchronize(self) -> None:
        """Wait until the device has finished the work queued so far (before reading a clock).

        The loop calls it once per log, never per step. The base does nothing: reading the
        loss already waits for it on eager devices; a lazy one (XLA) overrides this.
        """

    def agree(self, requests: int) -> int:
        """Bitwise OR of every rank's pending requests, so all ranks act alike."""
        return requests

    # -- state-dict layout
    # ``sharded=False``: the full state, complete on the main process (the only one that
    # writes it; other ranks may return less). ``sharded=True`` (for a checkpoint format with
    # ``CheckpointFormat.sharded``, which every rank writes): this rank's part, e.g. DTensors.
    def model_state_dict(self, model: nn.Module, *, sharded: bool = False) -> dict[str, Tensor]:
        return self.unwrap_model(model).state_dict()

    def load_model_state_dict(
        self, model: nn.Module, state: Mapping[str, Tensor], *, sharded: bool = False
    ) -> None:
        self.unwrap_model(model).load_state_dict(state)

    def optimizer_state_dict(
        self, optimizer: Optimizer, *, sharded: bool = False
    ) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state_dict(
        self, optimizer: Optimizer, state: Mapping[str, Any], *, sharded: bool = False
    ) -> None:
        optimizer.load_state_dict(dict(state))


class CheckpointFormat:
    """How named tensors are written to and read from a checkpoint directory.

    The run owns the directory (temporary name, fsync, rename, ``latest``); the format owns
    the files for each ``stem`` (``"model"``, ``"optimizer"``, ...).
    """

    name: ClassVar[str] = "format"
    #: Every rank writes its own shards of the weights and optimizer state, through
    #: ``save_sharded`` / ``load_sharded`` (collective calls); the rest is written by the main
    #: process through the methods below, as for any format.
    sharded: ClassVar[bool] = False

    def save_sharded(self, directory: Path, stem: str, tensors: Mapping[str, Tensor]) -> list[str]:
        """Called on every rank with its part of ``stem`` (DTensors or replicated tensors)."""
        raise NotImplementedError

    def load_sharded(
        self, directory: Path, stem: str, template: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Called on every rank: the stored tensors of ``stem``, those named in ``template``
        read into its tensors in place (each rank reads only its shards), any others whole."""
        raise NotImplementedError

    def save_tensors(self, directory: Path, stem: str, tensors: Mapping[str, Tensor]) -> list[str]:
        """Write ``tensors``; return the file names written (relative to ``directory``)."""
        raise NotImplementedError

    def load_tensors(self, directory: Path, stem: str) -> dict[str, Tensor]:
        raise NotImplementedError

    def save_model(
        self, directory: Path, model: nn.Module, state: Mapping[str, Tensor]
    ) -> list[str]:
        """Write model weights; a format may shard them or de-duplicate tied tensors."""
        return self.save_tensors(directory, "model", state)

    def load_model(self, directory: Path, model: nn.Module) -> dict[str, Tensor]:
        return self.load_tensors(directory, "model")

    def export_model(self, source: Path, directory: Path, state: Mapping[str, Tensor]) -> list[str]:
        """Write the weights ``state`` of the checkpoint at ``source`` into ``directory``, a
        weights-only folder (``treadle export``); return the file names written.

        There is no model here, only its tensors: the default writes them as ``save_model``
        does for an empty module (tied tensors are recognised by shared storage). A format
        whose files need more than tensors (a model's configuration) reads it from
        ``source`` or from its own options.
        """
        return self.save_model(directory, nn.Module(), state)


#: the store a run uses unless told otherwise, and the one ``treadle.checkpoint.verify``,
#: ``resolve`` and ``treadle.load_weights`` ask
DEFAULT_STORE = "directory"


class CheckpointStore:
    """Where checkpoints live and how one is made durable; entry-point group ``treadle.store``.

    The kernel decides when to save and what a checkpoint holds (a ``treadle.checkpoint.Snapshot``,
    captured on every rank); the store keeps it, and finds, reads and checks it again to
    resume. The first-party ``directory`` store writes the protocol of docs/checkpoints.md,
    with the run's ``CheckpointFormat`` writing the tensors. Every method but ``verify``,
    ``resolve`` and ``load_weights`` is called on every rank at once.
    """

    name: ClassVar[str] = "store"

    def check(self, run: Run) -> None:
        """Refuse (``ConfigError``), when the run is composed, what this store cannot do."""

    def hold(self, run: Run) -> contextlib.AbstractContextManager[Any]:
        """Exclusive use of the run's output while ``fit`` or ``save`` runs."""
        return contextlib.nullcontext()

    def write(self, run: Run, snapshot: Snapshot, *, background: bool = False) -> Path:
        """Keep ``snapshot``; returns where. ``background``: return once the snapshot is
        copied, and complete the write before ``finish`` returns."""
        raise NotImplementedError

    def finish(self, run: Run) -> Path | None:
        """Wait for a background ``write``; its location, or None if none was in flight."""
        return None

    def existing(self, run: Run, step: int) -> Path | None:
        """The checkpoint of ``step`` this run's output holds already, if any."""
        return None

    def resume(self, run: Run, source: str) -> Path | None:
        """Find the checkpoint ``source`` names (``"auto"``: the newest that loads, None when
        there is none), read and check it, and apply it with ``treadle.checkpoint.restore``."""
        raise NotImplementedError

    def verify(self, path: Path | str) -> list[str]:
        """Problems with the checkpoint at ``path``; empty when it is whole."""
        raise NotImplementedError

    def resolve(self, path: Path | str) -> Path:
        """The checkpoint ``path`` names (it may name a place holding several)."""
        raise NotImplementedError

    def load_weights(self, model: nn.Module, path: Path | str, *, strict: bool, check: bool) -> Any:
        """Fill ``model`` with the weights of the checkpoint at ``path``."""
        raise NotImplementedError


class Logger:
    """A metrics sink. Subclasses implement ``start``, ``log`` and ``finish``.

    By default only the main process writes (``all_ranks = False``).
    """

    name: ClassVar[str] = "logger"
    all_ranks: ClassVar[bool] = False
    _started = False

    def start(self, run: Run) -> None:
        """Open files or connections; ``run.hparams()`` is the run's configuration."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Flush and close. ``start`` is called again if the run fits again."""

    def _active(self, run: Run) -> bool:
        return self.all_ranks or run.is_main_process

    @hookimpl
    def on_fit_begin(self, run: Run) -> None:
        if self._active(run) and not self._started:
            self._started = True
            self.start(run)

    @hookimpl
    def on_log(self, run: Run, metrics: Mapping[str, float]) -> None:
        if not self._active(run):
            return
        if not self._started:
            self._started = True
            self.start(run)
        self.log(metrics, int(metrics.get("step", run.state.step)))

    @hookimpl
    def on_fit_end(self, run: Run) -> None:
        if self._started:
            self._started = False
            self.finish()

    @hookimpl
    def on_exception(self, run: Run) -> None:
        self.on_fit_end(run)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``, without blocking."""
    if isinstance(batch, Tensor):
        # ``to`` returns the tensor itself when it is already there, at ten times the cost
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, (dict, Mapping)):  # dict first: it spares the ABC check
        return {
            # a tensor already in place (the common case) without a recursive call
            k: v if isinstance(v, Tensor) and v.device == device else move_to_device(v, device)
            for k, v in batch.items()
        }
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch
