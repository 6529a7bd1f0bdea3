"""What every torch.distributed strategy shares: joining the process group, the collectives the
loop needs, agreeing on requests, printing the global batch, and leaving cleanly (evaluation
over sharded data comes from ``ShardedEvaluation``, the stuck-rank watchdog from ``_watchdog``).

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

from treadle.config import Config
from treadle.defaults import batch_rows
from treadle.errors import ConfigError, TreadleError, TreadleWarning
from treadle.hookspecs import hookimpl
from treadle.plugins.strategies._gather import ShardedEvaluation
from treadle.plugins.strategies._watchdog import Watchdog

if TYPE_CHECKING:
    from treadle.run import Run
    from treadle.state import State

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


class TorchDistributed(ShardedEvaluation):
    """One process per device, on a torch.distributed process group.

    Args:
        backend: the process-group backend; "auto" picks NCCL for CUDA, gloo for CPU, and
            torch's default for other devices. Any backend torch knows ("gloo", "nccl",
            "cpu:gloo,cuda:nccl") is passed through.
        timeout: seconds a collective may wait before the group reports an error, and a
            rank may make no progress before its watchdog ends it; None (the default):
            ``Config.collective_timeout_s``. A process group the program made itself keeps
            its own timeout (the watchdog still uses this one).
        device: "auto" (this process's CUDA device, ``LOCAL_RANK``, if CUDA is available,
            else CPU), "cpu", or a device type ("cuda"); the index is always ``LOCAL_RANK``.

    Raises:
        ConfigError: a non-positive timeout, or a device that is not available.
    """

    name = "torch-distributed"

    def __init__(
        self, *, backend: str = "auto", timeout: float | None = None, device: str = "auto"
    ) -> None:
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout < float("inf")
        ):
            raise ConfigError(
                f"strategy {self.name!r}: timeout={timeout!r} must be a positive number of "
                "seconds, or None for Config.collective_timeout_s"
            )
        if not isinstance(backend, str) or not backend:
            raise ConfigError(f"strategy {self.name!r}: backend={backend!r} must be a name")
        self.backend = backend
        self.requested_timeout = None if timeout is None else float(timeout)
        #: the collectives' timeout and the watchdog's limit (None: torch's, no watchdog);
        #: known at ``setup``, from the option or ``Config.collective_timeout_s``
        self.timeout: float | None = self.requested_timeout
        self._watchdog: Watchdog | None = None
        self._state: State | None = None  # the run's, for the step in error messages
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
        # ``run`` may be None where a strategy is driven without one (the conformance kit)
        self._state = getattr(run, "state", None)
        if self.requested_timeout is None:
            config = getattr(run, "config", None) or Config()
            limit = config.collective_timeout_s
            self.timeout = None if limit is None else float(limit)
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
        kwargs: dict[str, Any] = {"backend": backend}
        if self.timeout is not None:  # else torch's default
            kwargs["timeout"] = datetime.timedelta(seconds=self.timeout)
        if self.device.type == "cuda":
            kwargs["device_id"] = self.device  # binds NCCL to this GPU at once
        if _launched():
            missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise ConfigError(
                    f"strategy {self.name!r}: RANK and WORLD_SIZE are set but {' and '.join(missing)} "
                    "are not; start the processes with torchrun or `treadle launch`, which set them"
                )
            store = _attempt_store(dist, kwargs.get("timeout"))
            if store is not None:
                kwargs.update(
                    store=store,
                    rank=int(os.environ["RANK"]),
                    world_size=int(os.environ["WORLD_SIZE"]),
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
        self._stop_watchdog()
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
        try:
            dist.all_reduce(tensor, op=reduce_op)
        except RuntimeError as exc:
            raise self._collective_failed("all_reduce", exc) from exc
        if op == "mean":
            tensor.div_(self.world_size)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, obj, group=self._host_group)
        except RuntimeError as exc:
            raise self._collective_failed("all_gather_object", exc) from exc
        return gathered

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        try:
            if self._host_group is None and self._host_device.type == "cuda":
                dist.barrier(device_ids=[self._host_device.index])
            else:
                dist.barrier(group=self._host_group)
        except RuntimeError as exc:
            raise self._collective_failed("barrier", exc) from exc

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
        try:
            dist.all_reduce(bits, op=dist.ReduceOp.MAX, group=self._host_group)
        except RuntimeError as exc:
            raise self._collective_failed("agree", exc) from exc
        return sum(1 << i for i, bit in enumerate(bits.tolist()) if bit)

    def _collective_failed(self, collective: str, exc: RuntimeError) -> Exception:
        """The error to raise for a failed collective: a TreadleError naming the step, the
        collective and the timeout when another rank is late or gone, else ``exc`` itself."""
        if not _lost_peer(exc):
            return exc
        return TreadleError(f"{self._failure_summary(collective)} ({_first_line(exc)})")

    def _failure_summary(self, collective: str) -> str:
        step = "?" if self._state is None else self._state.step
        timeout = "torch's default" if self.timeout is None else f"{self.timeout:g} s"
        return (
            f"rank {self.rank}: collective {collective!r} failed at step {step}: another rank "
            f"did not join it within the process group's timeout ({timeout}; "
            "Config.collective_timeout_s) or has ended. That rank is stuck or dead; its own "
            "output says where (a stuck rank's watchdog prints 'treadle: rank N made no "
            "progress ...')"
        )

    # ------------------------------------------------------------------ the global batch

    @hookimpl(tryfirst=True)  # before any plugin's on_fit_begin, which the watchdog watches
    def on_fit_begin(self, run: Run) -> None:
        """Start this rank's watchdog; print the global batch once, on the main process."""
        if self.world_size > 1 and self.timeout is not None:
            if self._watchdog is None or self._watchdog.run is not run:
                self._watchdog = Watchdog(
                    run,
                    self.timeout,
                    rank=self.rank,
                    collectives={
                        "agree": self.agree,
                        "all_reduce": self.all_reduce,
                        "barrier": self.barrier,
                        "all_gather_object": self.all_gather_object,
                    },
                )
            self._watchdog.start()
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

    @hookimpl
    def on_eval_step_end(self) -> None:
        """An evaluation batch is progress (a long evaluation changes no step counter)."""
        if self._watchdog is not None:
            self._watchdog.beats += 1

    @hookimpl
    def on_predict_step_end(self) -> None:
        if self._watchdog is not None:
            self._watchdog.beats += 1

    @hookimpl(trylast=True)  # after every plugin's on_fit_end, which the watchdog watches
    def on_fit_end(self) -> None:
        self._stop_watchdog()

    @hookimpl(trylast=True)
    def on_exception(self, exception: BaseException) -> None:
        """Stop the watchdog; name the step and the timeout in a collective's own error
        (DDP's and FSDP's, which run inside the engine, not through this strategy)."""
        self._stop_watchdog()
        if (
            self.world_size > 1
            and isinstance(exception, RuntimeError)
            and not isinstance(exception, TreadleError)
            and _lost_peer(exception)
        ):
            exception.add_note(f"treadle: {self._failure_summary('inside the engine')}")

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()


#: words of torch's and gloo's/NCCL's messages when a peer is late or gone
_LOST_PEER_WORDS = ("timed out", "timeout", "connection closed", "connection reset",
                    "broken pipe", "connection refused")  # fmt: skip


def _lost_peer(exc: BaseException) -> bool:
    import torch.distributed as dist

    kinds = tuple(
        getattr(dist, name)
        for name in ("DistBackendError", "DistNetworkError")
        if hasattr(dist, name)
    )
    text = str(exc).lower()
    return isinstance(exc, kinds) or any(word in text for word in _LOST_PEER_WORDS)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _attempt_store(dist: Any, timeout: datetime.timedelta | None) -> Any:
    """Under ``torchrun --max-restarts``: the launcher's store, with keys of this attempt only.

    torchrun's workers share its rendezvous store, which outlives a restart; the group of a
    restarted attempt would read the addresses the previous attempt's ranks published there
    and fail to connect to the dead ones. Prefixing the keys with the restart count keeps each
    attempt's group to itself. None: not under torchrun's shared store (``init_process_group``
    reads the environment as usual).
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout or datetime.timedelta(minutes=30),
    )
    return dist.PrefixStore(f"treadle/attempt-{restart}", store)


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
