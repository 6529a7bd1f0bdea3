"""``ddp``: torch's DistributedDataParallel, one process per device.

Every rank holds the whole model; gradients are averaged across ranks during backward (in
buckets, overlapped with computation) and skipped on the non-final micro-batches of an
accumulation window (``no_sync``). gloo on CPU, NCCL on CUDA. Launch with
``treadle launch --nproc-per-node N RUN.toml`` or ``torchrun``; see docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

from torch import nn

from treadle.errors import ConfigError
from treadle.plugins.strategies._distributed import TorchDistributed

__all__ = ["DDPStrategy"]


class DDPStrategy(TorchDistributed):
    """Data parallel training with ``torch.nn.parallel.DistributedDataParallel``.

    The DDP options are passed through unchanged (their meaning is torch's):

    Args:
        find_unused_parameters: allow parameters that receive no gradient in a step (slower).
        static_graph: the set of used parameters and the graph never change (enables
            optimisations, and unused parameters without ``find_unused_parameters``).
        gradient_as_bucket_view: gradients are views into the communication buckets (saves
            one copy of the gradients in memory).
        bucket_cap_mb: size of a gradient bucket in MiB (torch's default when None: 25).
        broadcast_buffers: copy rank 0's buffers (batch-norm statistics) to every rank at
            each forward (HF: ``ddp_broadcast_buffers``). Passed to torch as
            ``forward_sync_buffers`` where torch has it (2.13 deprecated the old name); buffers
            are synchronised once when the model is wrapped either way.
        backend: the process-group backend ("auto": NCCL for CUDA, gloo for CPU).
        timeout: seconds a collective may wait before the group reports an error (and a
            rank may make no progress before its watchdog ends it); None:
            ``Config.collective_timeout_s``.
        device: "auto" (CUDA if available, else CPU), "cpu", or a device type.

    Raises:
        ConfigError: an option has the wrong type, or the device is not available.

    Example::

        treadle.Run(model=model, train_data=data, strategy={"name": "ddp", "static_graph": True})
    """

    name = "ddp"

    def __init__(
        self,
        *,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = False,
        bucket_cap_mb: float | None = None,
        broadcast_buffers: bool = True,
        backend: str = "auto",
        timeout: float | None = None,
        device: str = "auto",
    ) -> None:
        super().__init__(backend=backend, timeout=timeout, device=device)
        flags = {
            "find_unused_parameters": find_unused_parameters,
            "static_graph": static_graph,
            "gradient_as_bucket_view": gradient_as_bucket_view,
            "broadcast_buffers": broadcast_buffers,
        }
        for option, value in flags.items():
            if not isinstance(value, bool):
                raise ConfigError(f"strategy 'ddp': {option}={value!r} must be true or false")
        if bucket_cap_mb is not None and (
            isinstance(bucket_cap_mb, bool)
            or not isinstance(bucket_cap_mb, int | float)
            or bucket_cap_mb <= 0
        ):
            raise ConfigError(
                f"strategy 'ddp': bucket_cap_mb={bucket_cap_mb!r} must be a positive number"
            )
        self.ddp_options: dict[str, Any] = dict(flags)
        if bucket_cap_mb is not None:
            self.ddp_options["bucket_cap_mb"] = bucket_cap_mb
        self._ddp: nn.Module | None = None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Place the model on this rank's device and wrap it; rank 0's weights are broadcast."""
        from torch.nn.parallel import DistributedDataParallel

        module = self.precision.convert_module(model).to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        options = dict(self.ddp_options)
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
            options["forward_sync_buffers"] = options.pop("broadcast_buffers")
        self._ddp = DistributedDataParallel(module, device_ids=device_ids, **options)
        return self._ddp

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return model.module if isinstance(model, DistributedDataParallel) else model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """DDP's own ``no_sync``: gradients accumulate locally until the window's last backward."""
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def _release(self) -> None:
        self._ddp = None
