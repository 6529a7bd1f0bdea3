"""What every torch.distributed strategy shares: joining the process group, the collectives the
loop needs, agreeing on requests, printing the global batch, and leaving cleanly.

``TorchDistributed`` is the base of ``ddp`` and ``fsdp``, and of any strategy whose engine runs
on a torch.distributed process group. It reads the launcher's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``: what ``torchrun`` and
``treadle launch`` set, on one node or many) and joins the default process group, or reuses it
when the program already initialised one. Without a launcher it runs as a world of one process.

Small host-side collectives (request agreement, barriers, gathering objects) go through a gloo
group when the main backend is not gloo (NCCL), so they never wait for the accelerator's queue.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from treadle.components import Strategy
from treadle.defaults import batch_rows
from treadle.errors import ConfigError, TreadleError, TreadleWarning
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["TorchDistributed", "free_port", "parse_dtype"]

# The loop's requests are bit flags; each becomes one element, reduced with MAX (an OR per bit:
# NCCL has no bitwise reductions). 16 bits leave room for flags the kernel may add.
_REQUEST_BITS = 16
_OPS = ("mean", "sum", "max", "min")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(
    value: str | torch.dtype | None, *, option: str, strategy: str
) -> torch.dtype | None:
    """A dtype from its name ("bfloat16", "bf16", "float32", ...) or None.

    Raises:
        ConfigError: not a floating-point dtype name.
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = _DTYPES.get(str(value).lower().removeprefix("torch."))
    if dtype is None:
        raise ConfigError(
            f"strategy {strategy!r}: {option}={value!r} is not a dtype; "
            f"use one of {', '.join(sorted(_DTYPES))}"
        )
    return dtype


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class TorchDistributed(Strategy):
    """One process per device, on a torch.distributed process group.

    Args:
        backend: the process-group backend; "auto" picks NCCL for CUDA, gloo for CPU, and
            torch's default for other devices. Any backend torch knows ("gloo", "nccl",
            "cpu:gloo,cuda:nccl") is passed through.
        timeout: seconds a collective may wait before the group reports an error.
        device: "auto" (this process's CUDA device, ``LOCAL_RANK``, if CUDA is available,
            else CPU), "cpu", or a device type ("cuda"); the index is always ``LOCAL_RANK``.

    Raises:
        ConfigError: a non-positive timeout, or a device that is not available.
    """

    name = "torch-distributed"

    def __init__(self, *, backend: str = "auto", timeout: float = 1800.0, device: str = "auto"):
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(
                f"strategy {self.name!r}: timeout={timeout!r} must be a positive number of seconds"
            )
        if not isinstance(backend, str) or not backend:
            raise ConfigError(f"strategy {self.name!r}: backend={backend!r} must be a name")
        self.backend = backend
        self.timeout = float(timeout)
        self.requested_device = device
        # Known before setup, so that ``run.is_main_process`` is right while the run composes.
        self.rank, self.world_size, self.local_rank = _ranks_now()
        self.device = self._choose_device(device)
        self._owns_group = False
        self._host_group: Any = None
        self._host_device = torch.device("cpu")
        self._printed_batch = False

    # ------------------------------------------------------------------ life cycle

    def _choose_device(self, device: str) -> torch.device:
        kind = device
        if device == "auto":
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        if kind == "cpu":
            return torch.device("cpu")
        try:
            chosen = torch.device(kind)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(
                f"strategy {self.name!r}: device={device!r} is not a device type ({exc})"
            ) from None
        if chosen.index is not None:
            raise ConfigError(
                f"strategy {self.name!r}: device={device!r}: give the device type only; each "
                "process uses the device numbered by its LOCAL_RANK"
            )
        module = getattr(torch, chosen.type, None)
        available = getattr(module, "is_available", None)
        if available is None or not available():
            raise ConfigError(
                f"strategy {self.name!r}: device={device!r} was asked for, but torch reports "
                f"no {chosen.type} device"
            )
        return torch.device(chosen.type, self.local_rank)

    def _backend_for(self, device: torch.device) -> str | None:
        if self.backend != "auto":
            return self.backend
        return {"cuda": "nccl", "cpu": "gloo"}.get(device.type)

    def setup(self, run: Run) -> None:
        """Join (or reuse) the default process group, select this rank's device."""
        import torch.distributed as dist

        if not dist.is_available():
            raise TreadleError(
                f"strategy {self.name!r} needs torch.distributed, which this torch build lacks"
            )
        if not dist.is_initialized():
            self._init_group(dist)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.local_rank))
        if self.device.type != "cpu":
            self.device = torch.device(self.device.type, self.local_rank)
            module = getattr(torch, self.device.type, None)
            if module is not None and hasattr(module, "set_device"):
                module.set_device(self.device)
        self._setup_host_group(dist)
        super().setup(run)

    def _init_group(self, dist: Any) -> None:
        backend = self._backend_for(self.device)
        timeout = datetime.timedelta(seconds=self.timeout)
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if self.device.type == "cuda":
            kwargs["device_id"] = self.device  # binds NCCL to this GPU at once
        if _launched():
            missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise ConfigError(
                    f"strategy {self.name!r}: RANK and WORLD_SIZE are set but {' and '.join(missing)} "
                    "are not; start the processes with torchrun or `treadle launch`, which set them"
                )
            dist.init_process_group(**kwargs)
        else:
            warnings.warn(
                f"strategy {self.name!r}: not started by a launcher (no RANK/WORLD_SIZE in the "
                "environment), so this is a world of one process; use `treadle launch "
                "--nproc-per-node N` or torchrun for more",
                TreadleWarning,
                stacklevel=3,
            )
            dist.init_process_group(
                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, **kwargs
            )
        self._owns_group = True

    def _setup_host_group(self, dist: Any) -> None:
        if self._host_group is not None or self.world_size == 1:
            return
        if "gloo" in str(dist.get_backend()):
            self._host_device = torch.device("cpu")
            return
        try:
            self._host_group = dist.new_group(backend="gloo")
            self._host_device = torch.device("cpu")
        except Exception:  # gloo missing from this build: use the main group on the device
            self._host_device = self.device

    def teardown(self) -> None:
        """Free the wrapped model, then leave the process group if this strategy joined it."""
        self._release()
        gc.collect()  # DDP's reducer and FSDP's state must die before their process group
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if self._host_group is not None:
                dist.destroy_process_group(self._host_group)
            if self._owns_group:
                dist.destroy_process_group()
        self._host_group = None
        self._owns_group = False

    def _release(self) -> None:
        """Drop this strategy's references to wrappers and engines (subclasses)."""

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """Reduce ``tensor`` over ranks, in place where possible; returns the result."""
        if op not in _OPS:
            raise ValueError(f"all_reduce: op={op!r}; expected one of {', '.join(_OPS)}")
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        if op == "mean" and not tensor.is_floating_point():
            tensor = tensor.double()
        reduce_op = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}.get(op, dist.ReduceOp.SUM)
        dist.all_reduce(tensor, op=reduce_op)
        if op == "mean":
            tensor.div_(self.world_size)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self._host_group)
        return gathered

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        if self._host_group is None and self._host_device.type == "cuda":
            dist.barrier(device_ids=[self._host_device.index])
        else:
            dist.barrier(group=self._host_group)

    def agree(self, requests: int) -> int:
        """Bitwise OR of every rank's requests, with one small all-reduce (MAX per bit)."""
        if self.world_size == 1:
            return requests
        import torch.distributed as dist

        bits = torch.tensor(
            [(requests >> i) & 1 for i in range(_REQUEST_BITS)],
            dtype=torch.int32,
            device=self._host_device,
        )
        dist.all_reduce(bits, op=dist.ReduceOp.MAX, group=self._host_group)
        return sum(1 << i for i, bit in enumerate(bits.tolist()) if bit)

    # ------------------------------------------------------------------ the global batch

    @hookimpl
    def on_fit_begin(self, run: Run) -> None:
        """Print the global batch once, on the main process."""
        if self._printed_batch or not run.is_main_process:
            return
        self._printed_batch = True
        accumulation = run.config.grad_accum_steps
        per_device = _per_device_batch(run)
        factors = (
            f"{self.world_size} process(es) on {self.device.type} x per-device batch "
            f"{per_device if per_device is not None else '(as the data yields it)'} x "
            f"{accumulation} accumulation step(s)"
        )
        total = "?" if per_device is None else str(per_device * self.world_size * accumulation)
        print(
            f"treadle: {self.name}: global batch {total} = {factors}", file=sys.stderr, flush=True
        )


def _ranks_now() -> tuple[int, int, int]:
    """(rank, world size, local rank) from an initialised group or the launcher's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
    if "LOCAL_RANK" in os.environ:
        return rank, world, int(os.environ["LOCAL_RANK"])
    # A group the program made itself, without a launcher: assume ranks fill nodes in order.
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return rank, world, rank % count if count else 0


def _per_device_batch(run: Run) -> int | None:
    data = run.train_data
    batch_size = getattr(data, "batch_size", None)
    if isinstance(batch_size, int):
        return batch_size
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if isinstance(data, torch.utils.data.Dataset):
            return run.config.batch_size
        if isinstance(data, Sequence) and not isinstance(data, str | bytes) and len(data):
            return batch_rows(data[0])  # a list of ready batches
    return None


def module_classes(model: nn.Module) -> list[str]:
    """The class names of ``model``'s submodules, for error messages."""
    return sorted({type(m).__name__ for m in model.modules()})
