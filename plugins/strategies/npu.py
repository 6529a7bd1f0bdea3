"""``npu``: Huawei Ascend NPUs through torch_npu, data parallel with the HCCL backend.

``ddp`` on the ``npu`` device: ``import torch_npu`` (which registers the device and
``torch.npu``), ``torch.npu.set_device(LOCAL_RANK)`` before the process group is joined with
``backend="hccl"``, then ``DistributedDataParallel`` as for ``ddp`` (``no_sync`` included).
Checkpoints keep each rank's NPU random state (``torch.npu.get_rng_state``), as for CUDA.

Written against torch_npu's public API and tested only against a fake ``torch_npu`` (no
torch_npu release matches this project's torch; installing one replaces torch's own
libraries): real runs are for users with the hardware. See docs/distributed-engines.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from treadle.errors import MissingDependencyError
from treadle.plugins.strategies.ddp import DDPStrategy

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["NPUStrategy"]


def _torch_npu() -> Any:
    """``import torch_npu`` (registers the ``npu`` device and ``torch.npu``)."""
    try:
        import torch_npu
    except ImportError as exc:
        error = MissingDependencyError("strategy 'npu'", "torch_npu", "npu")
        error.msg = (
            "strategy 'npu' needs torch_npu, which is not installed. Install the torch_npu "
            "release built for your torch version and CANN toolkit (see "
            "https://gitee.com/ascend/pytorch); it has no treadle extra, because it must "
            "match torch exactly."
        )
        error.args = (error.msg,)  # ImportError's message is msg; args for pickling
        raise error from exc
    return torch_npu


class NPUStrategy(DDPStrategy):
    """Data parallel training on Ascend NPUs: ``ddp`` with ``device="npu"``, ``backend="hccl"``.

    Args:
        backend: the process-group backend ("hccl").
        find_unused_parameters, static_graph, gradient_as_bucket_view, bucket_cap_mb,
            broadcast_buffers, timeout: as for ``ddp``.

    Raises:
        MissingDependencyError: torch_npu is not installed.
        ConfigError: torch_npu reports no NPU.

    Example::

        treadle.Run(model=model, train_data=data, strategy="npu", precision="bf16-mixed")
    """

    name = "npu"

    def __init__(
        self,
        *,
        backend: str = "hccl",
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = False,
        bucket_cap_mb: float | None = None,
        broadcast_buffers: bool = True,
        timeout: float | None = None,
    ) -> None:
        _torch_npu()  # before the device is chosen: it makes "npu" a device torch knows
        super().__init__(
            find_unused_parameters=find_unused_parameters,
            static_graph=static_graph,
            gradient_as_bucket_view=gradient_as_bucket_view,
            bucket_cap_mb=bucket_cap_mb,
            broadcast_buffers=broadcast_buffers,
            backend=backend,
            timeout=timeout,
            device="npu",
        )

    def setup(self, run: Run) -> None:
        """Select this process's NPU, then join the HCCL group (HCCL binds to it on joining)."""
        torch.npu.set_device(self.device)  # type: ignore[attr-defined]
        super().setup(run)
