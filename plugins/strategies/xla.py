"""``xla``: PyTorch/XLA (TPUs, and GPUs through XLA), one process per device.

Written against torch_xla's public API and tested only against a fake ``torch_xla`` (torch_xla
has no build for this project's torch on CPU): real runs are for users with the hardware.
See docs/distributed-engines.md.

What it does, in the loop's terms:

* device and ranks: ``torch_xla.device()`` (``xm.xla_device()`` on older releases),
  ``torch_xla.runtime.global_ordinal()``, ``world_size()``, ``local_ordinal()``;
* gradients: reduced across replicas once per optimizer step, before
  ``on_before_optimizer_step`` (``xm.reduce_gradients``, what ``xm.optimizer_step`` does
  first), so clipping sees synchronised gradients; micro-batches never synchronise;
* the step: the optimizer (through the precision plugin), then ``xm.mark_step()``, which cuts
  the lazy graph and runs it; also after every evaluation and prediction batch;
* timing: ``xm.wait_device_ops()`` before the loop reads its clock at a log
  (``Strategy.synchronize``);
* collectives: ``xm.all_reduce``; request agreement, object gathering and barriers on the
  host through ``xm.mesh_reduce`` and ``xm.rendezvous``;
* evaluation and prediction over sharded data: the sampler's padding cut off, every replica's
  outputs gathered in the data set's order (``ShardedEvaluation``, as for ``ddp``);
* saving: as ``xm.save`` does it, only the main process moves the state to CPU, and the
  replicas meet at a rendezvous; each replica's XLA random state goes into the checkpoint.

Launch one process per device the way torch_xla does (``torch_xla.launch`` / ``xmp.spawn``
calling a function that builds and fits the ``Run``, or ``torchrun`` for XLA:GPU).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import operator
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from treadle.errors import MissingDependencyError
from treadle.hookspecs import hookimpl
from treadle.plugins.strategies._gather import ShardedEvaluation

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["XLAStrategy"]

_OPS = ("mean", "sum", "max", "min")


def _torch_xla() -> tuple[Any, Any, Any]:
    """``(torch_xla, torch_xla.core.xla_model, torch_xla.runtime)``, imported on first use."""
    try:
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr
    except ImportError as exc:
        error = MissingDependencyError("strategy 'xla'", "torch_xla", "xla")
        error.msg = (
            "strategy 'xla' needs torch_xla, which is not installed. Install the torch_xla "
            "release built for your torch version (see https://github.com/pytorch/xla); it "
            "has no treadle extra, because it must match torch exactly."
        )
        error.args = (error.msg,)  # ImportError's message is msg; args for pickling
        raise error from exc
    return torch_xla, xm, xr


class XLAStrategy(ShardedEvaluation):
    """Train on an XLA device with torch_xla, one process per device.

    Raises:
        MissingDependencyError: torch_xla is not installed.

    Example::

        treadle.Run(model=model, train_data=data, strategy="xla", precision="bf16-mixed")
    """

    name = "xla"

    def __init__(self) -> None:
        try:  # checked now, imported at set-up
            missing = importlib.util.find_spec("torch_xla") is None
        except ValueError:  # already imported, without a spec
            missing = False
        if missing:
            _torch_xla()

    # ------------------------------------------------------------------ life cycle

    def setup(self, run: Run) -> None:
        """The XLA device and this replica's ordinals; seed XLA's random generator."""
        torch_xla, xm, xr = _torch_xla()
        self.device = torch_xla.device() if hasattr(torch_xla, "device") else xm.xla_device()
        self.rank, self.world_size = int(xr.global_ordinal()), int(xr.world_size())
        self.local_rank = int(xr.local_ordinal())
        if run is not None:
            xm.set_rng_state(run.config.seed, device=self.device)
        super().setup(run)

    # ------------------------------------------------------------------ the step

    def finalize_gradients(
        self, optimizer: torch.optim.Optimizer, divisor: torch.Tensor | float
    ) -> None:
        """Average the gradients over replicas (``xm.reduce_gradients``), then divide."""
        if self.world_size > 1:
            _, xm, _ = _torch_xla()
            xm.reduce_gradients(optimizer)
        super().finalize_gradients(optimizer, divisor)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step, then ``xm.mark_step()``: the step's graph is cut and executed."""
        stepped = self.precision.optimizer_step(optimizer)
        _, xm, _ = _torch_xla()
        xm.mark_step()
        return bool(stepped)

    @hookimpl
    def on_eval_step_end(self) -> None:
        _torch_xla()[1].mark_step()  # one graph per batch, not one for the whole evaluation

    @hookimpl
    def on_predict_step_end(self) -> None:
        _torch_xla()[1].mark_step()

    def synchronize(self) -> None:
        """``xm.wait_device_ops()``: the queued device work is part of the measured time."""
        _torch_xla()[1].wait_device_ops()

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """``xm.all_reduce`` over replicas (a mean is a sum scaled by 1/world size)."""
        if op not in _OPS:
            raise ValueError(f"all_reduce: op={op!r}; expected one of {', '.join(_OPS)}")
        if self.world_size == 1:
            return tensor
        _, xm, _ = _torch_xla()
        if op == "mean" and not tensor.is_floating_point():
            tensor = tensor.double()
        kind = {"max": xm.REDUCE_MAX, "min": xm.REDUCE_MIN}.get(op, xm.REDUCE_SUM)
        scale = 1.0 / self.world_size if op == "mean" else 1.0
        return xm.all_reduce(kind, tensor, scale=scale)  # type: ignore[no-any-return]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        _, xm, _ = _torch_xla()
        return list(xm.mesh_reduce("treadle.all_gather_object", obj, list))

    def barrier(self) -> None:
        if self.world_size > 1:
            _torch_xla()[1].rendezvous("treadle.barrier")

    def agree(self, requests: int) -> int:
        """The OR of every replica's requests, on the host (no device graph)."""
        if self.world_size == 1:
            return requests
        _, xm, _ = _torch_xla()
        reduce = functools.partial(functools.reduce, operator.or_)
        return int(xm.mesh_reduce("treadle.agree", int(requests), reduce))

    # ------------------------------------------------------------------ saving

    def model_state_dict(
        self, model: nn.Module, *, sharded: bool = False
    ) -> dict[str, torch.Tensor]:
        """On CPU, on the main process only (every process when ``sharded``), as ``xm.save``."""
        if not (sharded or self.is_main_process):
            return {}
        return _to_cpu(self.unwrap_model(model).state_dict())  # type: ignore[no-any-return]

    def optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, *, sharded: bool = False
    ) -> dict[str, Any]:
        if not (sharded or self.is_main_process):
            return {}
        return _to_cpu(optimizer.state_dict())  # type: ignore[no-any-return]

    @hookimpl
    def on_save_checkpoint(self, plugin_state: MutableMapping[str, Any]) -> None:
        """Every replica's XLA random state (called on every process: a collective)."""
        _, xm, _ = _torch_xla()
        states = self.all_gather_object(int(xm.get_rng_state(device=self.device)))
        plugin_state["xla"] = {"rng": states}

    @hookimpl
    def on_load_checkpoint(self, plugin_state: Mapping[str, Any]) -> None:
        states = (plugin_state.get("xla") or {}).get("rng") or []
        if len(states) == self.world_size:  # another world size: the seed from setup stays
            _torch_xla()[1].set_rng_state(int(states[self.rank]), device=self.device)


def _to_cpu(data: Any) -> Any:
    """Tensors moved to CPU in one batched transfer where torch_xla offers it (``xm.save``'s)."""
    _, xm, _ = _torch_xla()
    convert = getattr(xm, "_maybe_convert_to_cpu", None)
    if convert is not None:
        with contextlib.suppress(TypeError):
            return convert(data)
    if isinstance(data, torch.Tensor):
        return data.detach().to("cpu")
    if isinstance(data, Mapping):
        return {k: _to_cpu(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return type(data)(_to_cpu(v) for v in data)
    return data
