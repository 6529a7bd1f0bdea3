"""``accelerate``: Hugging Face Accelerate's ``Accelerator`` drives devices, processes and precision.

For teams already on Accelerate: the ``Accelerator`` is built the usual way, so it honours the
environment ``accelerate launch`` sets (from ``accelerate config``'s file: mixed precision, CPU,
process count, ...) and, under ``torchrun`` or ``treadle launch``, the torch.distributed
environment (two CPU processes run as ``MULTI_CPU`` over gloo). A config file can also be
named directly (``config_file``) when the run is not started by ``accelerate launch``.

What goes through Accelerate: the model (``prepare_model``: placement, DDP, the autocast of its
mixed precision), the optimizer (``prepare_optimizer``: the gradient scaler for fp16),
``accelerator.backward``, ``accelerator.no_sync`` for the non-final micro-batches of an
accumulation window, ``unscale_gradients``, the device batches are moved to, and
``get_state_dict`` for checkpoints. The precision is Accelerate's (``mixed_precision``), so a
separate precision plugin is refused when the run is composed.

What stays treadle's: the loop and its accumulation windows (``Config.grad_accum_steps``), the
scheduler (stepped once per applied optimizer step, not through ``prepare_scheduler``, which
steps once per process), and data loading: the training data is sharded by treadle's
resumable sampler over Accelerate's processes, so the order is the one ``single`` and ``ddp``
see, and a run resumes mid-epoch exactly. Accelerate's data-loader options
(``split_batches``, ``dispatch_batches``, ``even_batches``) therefore do not apply.

Distributed types that are whole engines of their own (DeepSpeed, FSDP, Megatron-LM, XLA) are
refused: use treadle's ``deepspeed``, ``fsdp`` or ``xla`` strategies for those.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from treadle.components import move_to_device
from treadle.errors import ConfigError, MissingDependencyError, TreadleError, require
from treadle.hookspecs import hookimpl
from treadle.plugins.strategies._distributed import TorchDistributed

if TYPE_CHECKING:
    from collections.abc import MutableMapping

    from treadle.run import Run

__all__ = ["AccelerateStrategy"]

_MIXED = ("no", "fp16", "bf16", "fp8")
#: Accelerate's distributed types that are data parallel over torch.distributed (or one device).
_DATA_PARALLEL = {
    "NO",
    "MULTI_CPU",
    "MULTI_GPU",
    "MULTI_NPU",
    "MULTI_MLU",
    "MULTI_SDAA",
    "MULTI_MUSA",
    "MULTI_XPU",
    "MULTI_HPU",
    "MULTI_NEURON",
}
_INSTEAD = {"DEEPSPEED": "deepspeed", "FSDP": "fsdp", "XLA": "xla", "MEGATRON_LM": "(none)"}
#: Accelerator arguments that treadle decides, with what decides them.
_OWNED = {
    "gradient_accumulation_steps": "Config.grad_accum_steps",
    "gradient_accumulation_plugin": "Config.grad_accum_steps",
    "deepspeed_plugin": "strategy 'deepspeed'",
    "deepspeed_plugins": "strategy 'deepspeed'",
    "fsdp_plugin": "strategy 'fsdp'",
    "megatron_lm_plugin": "another strategy",
    "log_with": "treadle's loggers",
    "project_dir": "Config.output_dir",
    "dataloader_config": "treadle's sampler",
    "split_batches": "treadle's sampler",
    "even_batches": "treadle's sampler",
    "dispatch_batches": "treadle's sampler",
    "step_scheduler_with_optimizer": "the kernel, which steps the scheduler",
}


def _accelerate() -> Any:
    return require("accelerate", extra="accelerate", what="strategy 'accelerate'")


def _check_installed() -> None:
    """Fail when the run is composed if Accelerate is missing, without importing it yet."""
    if importlib.util.find_spec("accelerate") is None:
        raise MissingDependencyError("strategy 'accelerate'", "accelerate", "accelerate")


class AccelerateStrategy(TorchDistributed):
    """Train through an ``accelerate.Accelerator``.

    Args:
        mixed_precision: "no", "fp16", "bf16" (or "fp8" where Accelerate supports it). None:
            what ``accelerate launch`` / ``ACCELERATE_MIXED_PRECISION`` / ``config_file`` says.
        cpu: force CPU even where an accelerator is present (Accelerate's ``cpu``). None: as
            Accelerate decides (``ACCELERATE_USE_CPU``, the config file).
        config_file: an ``accelerate config`` YAML file to take ``mixed_precision``,
            ``use_cpu`` and ``distributed_type`` from, for runs not started by
            ``accelerate launch`` (which reads it itself).
        find_unused_parameters, static_graph, broadcast_buffers, bucket_cap_mb: DDP options,
            through Accelerate's ``DistributedDataParallelKwargs``.
        accelerator_options: further ``Accelerator(...)`` keyword arguments (e.g.
            ``{"dynamo_backend": "inductor"}``); those treadle decides are refused.

    Raises:
        ConfigError: an unknown precision, an option treadle owns, or (at set-up) a
            distributed type that is an engine of its own, or a gradient accumulation setting
            that differs from ``Config.grad_accum_steps``.
        MissingDependencyError: Accelerate is not installed.

    Example::

        treadle.Run(model=model, train_data=data, strategy={"name": "accelerate",
                    "mixed_precision": "bf16"})
    """

    name = "accelerate"
    owns_precision: ClassVar[bool] = True

    def __init__(
        self,
        *,
        mixed_precision: str | None = None,
        cpu: bool | None = None,
        config_file: str | None = None,
        find_unused_parameters: bool | None = None,
        static_graph: bool | None = None,
        broadcast_buffers: bool | None = None,
        bucket_cap_mb: int | None = None,
        accelerator_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(device="cpu")  # the Accelerator chooses the device at set-up
        _check_installed()
        options = dict(accelerator_options or {})
        owned = sorted(set(options) & set(_OWNED))
        if owned:
            raise ConfigError(
                "strategy 'accelerate': accelerator_options may not set "
                + ", ".join(f"{key} (decided by {_OWNED[key]})" for key in owned)
            )
        from_file = _read_config_file(config_file) if config_file is not None else {}
        if mixed_precision is None:
            mixed_precision = from_file.get("mixed_precision")
        if mixed_precision is not None and mixed_precision not in _MIXED:
            raise ConfigError(
                f"strategy 'accelerate': mixed_precision={mixed_precision!r}; use one of "
                f"{', '.join(_MIXED)}"
            )
        if cpu is None:
            cpu = from_file.get("use_cpu")
        if cpu is not None and not isinstance(cpu, bool):
            raise ConfigError(f"strategy 'accelerate': cpu={cpu!r} must be true or false")
        kind = from_file.get("distributed_type")
        if kind in _INSTEAD:
            raise ConfigError(_engine_message(kind, config_file))
        ddp = {
            "find_unused_parameters": find_unused_parameters,
            "static_graph": static_graph,
            "broadcast_buffers": broadcast_buffers,
            "bucket_cap_mb": bucket_cap_mb,
        }
        self.ddp_options = {k: v for k, v in ddp.items() if v is not None}
        if mixed_precision is not None:
            options["mixed_precision"] = mixed_precision
        if cpu is not None:
            options["cpu"] = cpu
        self.accelerator_options = options
        self._accelerator: Any = None

    @property
    def accelerator(self) -> Any:
        """The ``accelerate.Accelerator`` once the run is set up, else None. Reading it never
        raises: pluggy before 1.7 reads every attribute of a plugin when it registers it."""
        return self._accelerator

    def _live_accelerator(self) -> Any:
        if self._accelerator is None:
            raise TreadleError("strategy 'accelerate' is not set up yet (run.setup() first)")
        return self._accelerator

    # ------------------------------------------------------------------ life cycle

    def setup(self, run: Run) -> None:
        """Build the Accelerator; it joins (or reuses) the process group and picks the device."""
        accelerate = _accelerate()
        import torch.distributed as dist

        before = dist.is_available() and dist.is_initialized()
        handlers = list(self.accelerator_options.pop("kwargs_handlers", []))
        if self.ddp_options:
            handlers.append(accelerate.DistributedDataParallelKwargs(**self.ddp_options))
        self._accelerator = accelerate.Accelerator(
            **self.accelerator_options, kwargs_handlers=handlers
        )
        state = self._accelerator.state
        kind = str(getattr(state.distributed_type, "name", state.distributed_type))
        if kind not in _DATA_PARALLEL:
            raise ConfigError(_engine_message(kind, None))
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if state.num_processes != launched:
            raise ConfigError(
                f"strategy 'accelerate': {launched} processes were started, but Accelerate "
                f"runs as {state.num_processes} ({kind}); on CPU it needs cpu=true (or "
                "ACCELERATE_USE_CPU=1) to join them as MULTI_CPU"
            )
        accumulation = self._accelerator.gradient_accumulation_steps
        if accumulation not in (1, run.config.grad_accum_steps):
            raise ConfigError(
                f"strategy 'accelerate': Accelerate is set to accumulate {accumulation} "
                f"micro-batches, but Config.grad_accum_steps={run.config.grad_accum_steps}; "
                "set them alike (treadle's loop decides the accumulation window)"
            )
        self._owns_group = not before and dist.is_available() and dist.is_initialized()
        self.rank, self.world_size = state.process_index, state.num_processes
        self.local_rank = state.local_process_index
        self.device = self._accelerator.device
        if dist.is_available() and dist.is_initialized():
            self._setup_host_group(dist)
        self.precision.setup(self.device)

    def _release(self) -> None:
        accelerator, self._accelerator = self._accelerator, None
        if accelerator is None:
            return
        accelerator.free_memory()  # drops its references to the prepared model and optimizer
        from accelerate.state import AcceleratorState, GradientState

        # Accelerate keeps its state per process; another run may ask for other options.
        # The process-group part stays while the group does.
        AcceleratorState._reset_state(reset_partial_state=self._owns_group)
        GradientState._reset_state()

    # ------------------------------------------------------------------ wrapping

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """``accelerator.prepare_model``: placement, DDP, and the autocast of mixed precision."""
        return self._live_accelerator().prepare_model(model)  # type: ignore[no-any-return]

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        if self._accelerator is None:
            return model
        return self._accelerator.unwrap_model(model)  # type: ignore[no-any-return]

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """``accelerator.prepare_optimizer`` (an ``AcceleratedOptimizer``)."""
        return self._live_accelerator().prepare_optimizer(optimizer)  # type: ignore[no-any-return]

    def to_device(self, batch: Any) -> Any:
        return move_to_device(batch, self.device)

    # ------------------------------------------------------------------ the step

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """``accelerator.no_sync``: no gradient synchronisation on non-final micro-batches."""
        return self._live_accelerator().no_sync(model)  # type: ignore[no-any-return]

    def backward(self, loss: torch.Tensor) -> None:
        """``accelerator.backward``: the fp16 gradient scaler, if any."""
        self._live_accelerator().backward(loss)

    def finalize_gradients(
        self, optimizer: torch.optim.Optimizer, divisor: torch.Tensor | float
    ) -> None:
        """Unscale (fp16), then divide by the kernel's divisor.

        ``accelerator.backward`` already divided each micro-batch's loss by Accelerate's own
        ``gradient_accumulation_steps`` (1 unless its configuration says otherwise), so only
        the rest of the division is done here.
        """
        accelerator = self._live_accelerator()
        accelerator.unscale_gradients(optimizer)
        self.divide_gradients(optimizer, divisor, done=accelerator.gradient_accumulation_steps)

    def clip_grad_norm(
        self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        # Gradients are unscaled and synchronised already: Accelerate's clip_grad_norm_ would
        # unscale a second time (an error in torch's GradScaler).
        return nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type=norm_type)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The AcceleratedOptimizer's step; False when the fp16 scaler skipped it."""
        optimizer.step()
        return not bool(getattr(optimizer, "step_was_skipped", False))

    # ------------------------------------------------------------------ state

    def model_state_dict(
        self, model: nn.Module, *, sharded: bool = False
    ) -> dict[str, torch.Tensor]:
        """``accelerator.get_state_dict``: the unwrapped model's weights."""
        if self._accelerator is None:  # not set up: the model as it was given
            return model.state_dict()
        return self._accelerator.get_state_dict(model)  # type: ignore[no-any-return]

    @hookimpl
    def on_save_checkpoint(self, plugin_state: MutableMapping[str, Any]) -> None:
        """The fp16 gradient scaler's state (scale, growth tracker), so resuming is exact."""
        scaler = getattr(self._accelerator, "scaler", None)
        if scaler is not None:
            plugin_state["accelerate"] = {"scaler": dict(scaler.state_dict())}

    @hookimpl
    def on_load_checkpoint(self, plugin_state: Mapping[str, Any]) -> None:
        scaler = getattr(self._accelerator, "scaler", None)
        saved = (plugin_state.get("accelerate") or {}).get("scaler")
        if scaler is not None and saved:
            scaler.load_state_dict(dict(saved))


def _engine_message(kind: str, source: str | None) -> str:
    where = f" ({source})" if source else ""
    instead = _INSTEAD.get(kind, "(none)")
    advice = (
        f"use treadle's strategy {instead!r} instead"
        if instead != "(none)"
        else "treadle has no strategy for it"
    )
    return (
        f"strategy 'accelerate': Accelerate is configured for {kind}{where}, an engine of its "
        f"own that treadle does not drive through Accelerate; {advice}"
    )


def _read_config_file(path: str) -> dict[str, Any]:
    """``mixed_precision``, ``use_cpu`` and ``distributed_type`` from an accelerate config."""
    if not Path(path).is_file():
        raise ConfigError(f"strategy 'accelerate': config_file={path!r} does not exist")
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        config = load_config_from_file(path)
    except Exception as exc:  # a YAML or JSON error, or a field Accelerate does not know
        raise ConfigError(f"strategy 'accelerate': cannot read {path}: {exc}") from exc
    kind = getattr(config, "distributed_type", None)
    precision = getattr(config, "mixed_precision", None)
    return {
        "mixed_precision": str(getattr(precision, "value", precision)) if precision else None,
        "use_cpu": getattr(config, "use_cpu", None),
        "distributed_type": str(getattr(kind, "name", kind)) if kind else None,
    }
