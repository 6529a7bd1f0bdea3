"""``deepspeed``: DeepSpeed's engine, ZeRO stages 0-3, with optimizer and parameter offload.

The engine owns what DeepSpeed owns: sharding (ZeRO), mixed precision and loss scaling
(``precision``), gradient clipping (``gradient_clipping``), accumulation across micro-batches
and the optimizer step. The kernel keeps its loop and calls the engine through this strategy:
``backward`` is ``engine.backward(loss)``, the optimizer step is ``engine.step()``, a non-final
micro-batch of an accumulation window is marked with ``engine.set_gradient_accumulation_boundary
(False)``. A separate precision plugin is refused when the run is composed.

What stays treadle's: the optimizer (``optimizer=``, a torch optimizer built by the kernel and
handed to ``deepspeed.initialize``) and the scheduler (``scheduler=``, stepped by the kernel after
each applied step, on the optimizer DeepSpeed steps), data loading and sharding, the loop, the
checkpoint directory. A DeepSpeed config's own ``optimizer`` and ``scheduler`` sections are
therefore refused, with the treadle equivalent to use.

The DeepSpeed config comes from the options below, from a DeepSpeed JSON file or mapping
(``config``), or both; an option and the file may not disagree. Batch keys are treadle's:
``train_micro_batch_size_per_gpu`` and ``gradient_accumulation_steps`` are filled in from the
run (``"auto"`` or absent), and a different number is an error.

Checkpoints: ``checkpoint="deepspeed"`` writes DeepSpeed's own files (every rank its partition)
and resumes from them; ``treadle export`` consolidates one into safetensors. A whole-file format
cannot hold partitioned optimizer state, so it is refused when the run would save.

Launch like any torch.distributed run (``treadle launch``, ``torchrun``), or with DeepSpeed's
launcher: ``treadle launch --launcher deepspeed ...``. See docs/distributed-engines.md.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from treadle.components import move_to_device
from treadle.errors import (
    ConfigError,
    MissingDependencyError,
    TreadleError,
    TreadleWarning,
    require,
)
from treadle.hookspecs import hookimpl
from treadle.plugins.strategies._distributed import TorchDistributed

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["DeepSpeedStrategy"]

_PRECISIONS = {
    "fp32": None,
    "32": None,
    "bf16": torch.bfloat16,
    "bf16-mixed": torch.bfloat16,
    "fp16": torch.float16,
    "fp16-mixed": torch.float16,
}
_OFFLOAD = ("cpu", "nvme")
#: ``ShareMemCommBuilder.NAME``: DeepSpeed's CPU shared-memory communication op
_SHM_COMM_OP = "deepspeed_shm_comm"
#: DeepSpeed config keys that describe the batch; treadle's Config decides them.
_BATCH_KEYS = {
    "train_micro_batch_size_per_gpu": "the per-device batch size of the training data",
    "gradient_accumulation_steps": "Config.grad_accum_steps",
    "train_batch_size": "per-device batch x grad_accum_steps x world size",
}


def _deepspeed() -> Any:
    return require("deepspeed", extra="deepspeed", what="strategy 'deepspeed'")


def _skip_shared_memory_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory communication op on CPU.

    DeepSpeed's torch backend compiles ``deepspeed_shm_comm`` when it is first made (at
    ``initialize`` or ``zero.Init``), into the shared ``~/.cache/torch_extensions`` under a lock
    file. The op serves only ``inference_all_reduce`` (tensor-parallel inference), which
    training never calls and which falls back to the process group without it; the build
    costs 20 s to minutes on first use, and a process killed while building leaves the lock
    behind, so that every later DeepSpeed run on the machine waits on it forever. DeepSpeed
    keeps its op-compatibility table in one module-level dict and reads it before building:
    marking the op incompatible there skips the build. Nothing is changed once DeepSpeed's
    backend exists (another library made it first).
    """
    import deepspeed.comm.comm as ds_comm
    import deepspeed.ops as ds_ops

    if getattr(ds_comm, "cdb", None) is not None:
        return
    compatible = getattr(ds_ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible[_SHM_COMM_OP] = False


def _check_installed() -> None:
    """Fail when the run is composed if DeepSpeed is missing, without importing it yet."""
    if importlib.util.find_spec("deepspeed") is None:
        raise MissingDependencyError("strategy 'deepspeed'", "deepspeed", "deepspeed")


class DeepSpeedStrategy(TorchDistributed):
    """Train with a DeepSpeed engine (``deepspeed.initialize``), one process per device.

    Args:
        stage: the ZeRO stage: 0 (data parallel), 1 (optimizer state sharded), 2 (and
            gradients), 3 (and parameters). Default: the config file's, else 2.
        offload_optimizer: keep optimizer state (and its step) on "cpu" or "nvme".
        offload_param: keep parameters on "cpu" or "nvme" (ZeRO 3 only).
        nvme_path: the folder for NVMe offload.
        precision: "fp32", "bf16" or "fp16" (DeepSpeed's mixed precision: 16-bit weights for
            compute, fp32 master weights in the optimizer; fp16 with dynamic loss scaling).
            Default: the config file's ``bf16``/``fp16`` section, else fp32.
        gradient_clipping: clip the global gradient norm to this value (DeepSpeed's
            ``gradient_clipping``); the ``grad-clip`` plugin cannot reach sharded gradients.
        config: a DeepSpeed config: the path of a JSON file, or a mapping. Its keys are passed
            to DeepSpeed unchanged, except those this docstring names.
        cpu_adam: with optimizer offload, run an Adam/AdamW optimizer's step as DeepSpeed's
            ``DeepSpeedCPUAdam`` (same update, vectorised C++; compiled on first use). With
            False, or another optimizer, the torch optimizer steps on CPU (slower).
        backend, timeout, device: as for ``ddp``.

    Raises:
        ConfigError: an option of the wrong kind, or one that disagrees with ``config``; when
            the run is composed, a config with ``optimizer``/``scheduler`` sections or batch
            keys that disagree with the run.
        MissingDependencyError: DeepSpeed is not installed.

    Example::

        treadle.Run(model=model, train_data=data, checkpoint="deepspeed",
                    strategy={"name": "deepspeed", "stage": 3, "precision": "bf16",
                              "offload_optimizer": "cpu", "gradient_clipping": 1.0})
    """

    name = "deepspeed"
    owns_precision: ClassVar[bool] = True

    def __init__(
        self,
        *,
        stage: int | None = None,
        offload_optimizer: str | None = None,
        offload_param: str | None = None,
        nvme_path: str | None = None,
        precision: str | None = None,
        gradient_clipping: float | None = None,
        config: str | Mapping[str, Any] | None = None,
        cpu_adam: bool = True,
        backend: str = "auto",
        timeout: float | None = None,
        device: str = "auto",
    ) -> None:
        super().__init__(backend=backend, timeout=timeout, device=device)
        _check_installed()
        self.base_config = _read_config(config)
        self.stage = self._stage(stage)
        self.compute_dtype = self._precision(precision)
        for option, value in (
            ("offload_optimizer", offload_optimizer),
            ("offload_param", offload_param),
        ):
            if value is not None and value not in _OFFLOAD:
                raise ConfigError(
                    f"strategy 'deepspeed': {option}={value!r}; use one of {', '.join(_OFFLOAD)} "
                    "or leave it out"
                )
        if offload_param is not None and self.stage != 3:
            raise ConfigError(
                f"strategy 'deepspeed': offload_param needs ZeRO stage 3 (stage is {self.stage})"
            )
        if offload_optimizer is not None and self.stage == 0:
            raise ConfigError("strategy 'deepspeed': offload_optimizer needs ZeRO stage 1, 2 or 3")
        if "nvme" in (offload_optimizer, offload_param) and not nvme_path:
            raise ConfigError("strategy 'deepspeed': NVMe offload needs nvme_path (a folder)")
        if gradient_clipping is not None and (
            isinstance(gradient_clipping, bool)
            or not isinstance(gradient_clipping, int | float)
            or gradient_clipping <= 0
        ):
            raise ConfigError(
                f"strategy 'deepspeed': gradient_clipping={gradient_clipping!r} must be a "
                "positive number"
            )
        if not isinstance(cpu_adam, bool):
            raise ConfigError(f"strategy 'deepspeed': cpu_adam={cpu_adam!r} must be true or false")
        self.offload_optimizer = offload_optimizer
        self.offload_param = offload_param
        self.nvme_path = nvme_path
        self.gradient_clipping = gradient_clipping
        self.cpu_adam = cpu_adam
        self._run: Run | None = None
        self._engine: Any = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._scale_wrt_gas = True

    # ------------------------------------------------------------------ options

    def _stage(self, stage: int | None) -> int:
        zero = self.base_config.get("zero_optimization") or {}
        from_file = zero.get("stage")
        if stage is None:
            stage = 2 if from_file is None else from_file
        elif from_file is not None and from_file != stage:
            raise ConfigError(
                f"strategy 'deepspeed': stage={stage} but the DeepSpeed config says "
                f"zero_optimization.stage={from_file}; give one of them"
            )
        if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
            raise ConfigError(f"strategy 'deepspeed': stage={stage!r}; use 0, 1, 2 or 3")
        return int(stage)

    def _precision(self, precision: str | None) -> torch.dtype | None:
        enabled = [
            key
            for key in ("bf16", "fp16")
            if (self.base_config.get(key) or {}).get("enabled") in (True, "true")
        ]
        from_file = enabled[0] if enabled else None
        if precision is None:
            return _PRECISIONS[from_file or "fp32"]
        if precision not in _PRECISIONS:
            raise ConfigError(
                f"strategy 'deepspeed': precision={precision!r}; use one of fp32, bf16, fp16"
            )
        dtype = _PRECISIONS[precision]
        if from_file is not None and _PRECISIONS[from_file] != dtype:
            raise ConfigError(
                f"strategy 'deepspeed': precision={precision!r} but the DeepSpeed config "
                f"enables {from_file}; give one of them"
            )
        return dtype

    def deepspeed_config(self, run: Run) -> dict[str, Any]:
        """The config handed to ``deepspeed.initialize`` for this run."""
        config = copy.deepcopy(self.base_config)
        for name, instead in (("optimizer", "optimizer="), ("scheduler", "scheduler=")):
            if name in config:
                raise ConfigError(
                    f"strategy 'deepspeed': the DeepSpeed config has a {name!r} section, but "
                    f"treadle's {instead} component builds the {name} (DeepSpeed steps it); "
                    f"remove the section and pass treadle.Run({instead}...) instead"
                )
        world = self.world_size
        micro = _per_device_batch(run) or 1
        wanted = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": run.config.grad_accum_steps,
            "train_batch_size": micro * run.config.grad_accum_steps * world,
        }
        for key, value in wanted.items():
            given = config.get(key, "auto")
            if given != "auto" and given != value:
                raise ConfigError(
                    f"strategy 'deepspeed': the DeepSpeed config sets {key}={given!r}, but this "
                    f'run has {value} ({_BATCH_KEYS[key]}); set it to "auto" or remove it'
                )
            config[key] = value
        zero = dict(config.get("zero_optimization") or {})
        zero["stage"] = self.stage
        for key, device in (
            ("offload_optimizer", self.offload_optimizer),
            ("offload_param", self.offload_param),
        ):
            if device is not None:
                offload: dict[str, Any] = {
                    "device": device,
                    "pin_memory": self.device.type == "cuda",
                }
                if device == "nvme":
                    offload["nvme_path"] = self.nvme_path
                zero[key] = {**offload, **(zero.get(key) or {})}
        config["zero_optimization"] = zero
        for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            section = dict(config.get(key) or {})
            section["enabled"] = self.compute_dtype == dtype
            config[key] = section
        clipping = config.get("gradient_clipping", "auto")
        if self.gradient_clipping is not None:
            if clipping not in ("auto", 0, 0.0, self.gradient_clipping):
                raise ConfigError(
                    f"strategy 'deepspeed': gradient_clipping={self.gradient_clipping} but the "
                    f"DeepSpeed config says {clipping}; give one of them"
                )
            config["gradient_clipping"] = self.gradient_clipping
        elif clipping == "auto":
            # DeepSpeed clips at 1.0 unless told otherwise; in treadle clipping is asked for
            config["gradient_clipping"] = 0.0
        # treadle's optimizer is the user's explicit choice, whatever its class
        config.setdefault("zero_allow_untested_optimizer", True)
        config.setdefault("steps_per_print", None)  # treadle's loggers report progress
        if self.offload_optimizer is not None and not self._uses_cpu_adam():
            config.setdefault("zero_force_ds_cpu_optimizer", False)
        return config

    def _uses_cpu_adam(self) -> bool:
        if self._optimizer is None:
            return False
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return isinstance(self._optimizer, DeepSpeedCPUAdam)

    # ------------------------------------------------------------------ launching

    @staticmethod
    def launch(argv: list[str]) -> int:
        """``treadle launch --launcher deepspeed [deepspeed options] RUN.toml [run options]``:
        DeepSpeed's own launcher starts ``python -m treadle run RUN.toml`` in each process.
        """
        from deepspeed.launcher import runner

        try:
            runner.main(launch_argv(argv))
        except SystemExit as exc:  # the launcher exits with its workers' failing exit code
            return exc.code if isinstance(exc.code, int) else 1
        return 0

    # ------------------------------------------------------------------ set-up

    def setup(self, run: Run) -> None:
        """Join the process group (as ``ddp`` does); the engine is built with the optimizer."""
        self._run = run
        super().setup(run)
        _skip_shared_memory_comm_build()

    @hookimpl
    def on_init_end(self, run: Run) -> None:
        """Before any compute: the DeepSpeed config this run gets must be valid, and the
        checkpoint format able to hold ZeRO's partitioned state."""
        from treadle.plugins.checkpoint.deepspeed_format import DeepSpeedFormat

        self.deepspeed_config(run)  # raises ConfigError for what disagrees with the run

        fmt, config = run.checkpoint_format, run.config
        saves = config.save_at_end or config.save_every or config.resume is not None
        if fmt is not None and not isinstance(fmt, DeepSpeedFormat) and saves:
            raise ConfigError(
                f"strategy 'deepspeed' saves weights and optimizer state as DeepSpeed's own "
                f"(partitioned) checkpoint: pass checkpoint='deepspeed' (not {fmt.name!r}), or "
                "checkpoint=None to save nothing; `treadle export` turns a 'deepspeed' "
                "checkpoint into safetensors"
            )

    def model_init_context(self) -> contextlib.AbstractContextManager[Any]:
        """ZeRO 3: build the model already partitioned (``deepspeed.zero.Init``)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        deepspeed = _deepspeed()
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3},
        }
        if self.compute_dtype is not None:
            config["bf16" if self.compute_dtype == torch.bfloat16 else "fp16"] = {"enabled": True}
        if self.offload_param is not None:
            config["zero_optimization"]["offload_param"] = {"device": self.offload_param}
        return deepspeed.zero.Init(config_dict_or_path=config)  # type: ignore[no-any-return]

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Place the model; DeepSpeed wraps it together with the optimizer."""
        if any(getattr(p, "ds_id", None) is not None for p in model.parameters()):
            return model  # built under zero.Init: already partitioned and placed
        return model.to(self.device)

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model) if model is self._engine else model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer DeepSpeed will step; with CPU offload, Adam runs as DeepSpeedCPUAdam."""
        if self.offload_optimizer is not None and self.cpu_adam:
            optimizer = _as_cpu_adam(optimizer)
        self._optimizer = optimizer
        return optimizer

    def attach_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """``deepspeed.initialize``: the engine the loop calls from now on."""
        deepspeed = _deepspeed()
        run = self._require_run()
        self._optimizer = optimizer
        config = self.deepspeed_config(run)
        self._scale_wrt_gas = run.config.loss_normalization == "mean"
        engine, _, _, _ = deepspeed.initialize(
            model=self.unwrap_model(model), optimizer=optimizer, config=config
        )
        # treadle's loop marks the window's last micro-batch itself (a short last window of
        # an epoch still steps), instead of DeepSpeed counting micro-batches
        engine.set_gradient_accumulation_boundary(True)
        if engine.optimizer is not optimizer:
            # The loop zeroes gradients through the optimizer it holds; under ZeRO that one
            # steps the engine's fp32 partitions, whose gradient buffers (offload) must live
            # on. The engine's own optimizer zeroes the gradients the engine tracks.
            optimizer.zero_grad = engine.optimizer.zero_grad  # type: ignore[method-assign]
        self._engine = engine
        return engine  # type: ignore[no-any-return]

    @property
    def engine(self) -> Any:
        """The DeepSpeed engine once the optimizer is attached (``run.setup_optimizer()``),
        else None. Reading it never raises: pluggy before 1.7 reads every attribute of a
        plugin when it registers it."""
        return self._engine

    def _live_engine(self) -> Any:
        if self._engine is None:
            raise TreadleError(
                "strategy 'deepspeed': there is no engine yet; it is built with the optimizer "
                "(run.fit() or run.setup_optimizer())"
            )
        return self._engine

    def _require_run(self) -> Run:
        if self._run is None:
            raise TreadleError("strategy 'deepspeed' is not set up (run.setup() first)")
        return self._run

    def _release(self) -> None:
        engine, optimizer = self._engine, self._optimizer
        self._engine, self._optimizer, self._run = None, None, None
        if optimizer is not None and "zero_grad" in vars(optimizer):
            del optimizer.zero_grad  # the optimizer's own again, without the engine
        if engine is not None:
            engine.destroy()  # removes ZeRO-3's hooks and frees the engine's buffers

    # ------------------------------------------------------------------ data

    def to_device(self, batch: Any) -> Any:
        """Move the batch; with 16-bit precision, floating-point inputs take the engine's dtype."""
        batch = move_to_device(batch, self.device)
        if self.compute_dtype is None or self._engine is None:
            return batch
        return _cast_floats(batch, self.compute_dtype)

    # ------------------------------------------------------------------ the step

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """A non-final micro-batch: not an accumulation boundary for the engine.

        ZeRO 0 and 1 then keep gradients local; ZeRO 2 and 3 reduce every micro-batch's
        gradients into their partitions (that is how they shard them).
        """
        return _not_boundary(self._engine) if self._engine is not None else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """``engine.backward``: loss scaling, and the division by the window (mean mode)."""
        self._live_engine().backward(loss, scale_wrt_gas=self._scale_wrt_gas)

    def finalize_gradients(
        self, optimizer: torch.optim.Optimizer, divisor: torch.Tensor | float
    ) -> None:
        """Correct the engine's accumulated gradients to the kernel's divisor.

        The engine divided each micro-batch's loss by ``gradient_accumulation_steps`` (mean
        mode); a shorter window (the last of an epoch) is rescaled to its own length. In tokens
        mode the engine did not divide, and the gradients are divided by the mean over ranks
        of the window's scored tokens here. Each rank scales only the gradients it holds
        (its ZeRO-3 partition, its ZeRO-1/2 fragment, or ``.grad``), without communication.
        """
        engine = self._live_engine()
        factor: torch.Tensor | float
        if isinstance(divisor, torch.Tensor):
            tokens = divisor.detach().clone()
            if self.world_size > 1:
                tokens = self.all_reduce(tokens, "mean")
            factor = 1.0 / tokens.clamp_min(1).double()
        else:
            steps = engine.gradient_accumulation_steps()
            if divisor == steps:
                return
            factor = steps / divisor
        _scale_gradients(engine, factor)

    def clip_grad_norm(
        self, parameters: Any, max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        raise ConfigError(
            "strategy 'deepspeed': the engine clips gradients (they are partitioned inside "
            "it); pass the strategy option gradient_clipping=... instead of the grad-clip plugin"
        )

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``engine.step()``; False when DeepSpeed skipped it (fp16 overflow)."""
        engine = self._live_engine()
        engine.step()
        return bool(engine.was_step_applied())

    # ------------------------------------------------------------------ state dicts

    def model_state_dict(
        self, model: nn.Module, *, sharded: bool = False
    ) -> Mapping[str, torch.Tensor]:
        """Sharded: a stand-in through which the engine saves itself (``checkpoint="deepspeed"``).
        Full: the whole weights on the main process (fp32 master weights under 16-bit
        precision); a collective call, other ranks get an empty dict.
        """
        if sharded:
            from treadle.plugins.checkpoint.deepspeed_format import EngineCheckpoint

            return EngineCheckpoint(self._save_engine, self._load_engine)
        if self._engine is None:  # before fit: the plain module on this device
            return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return self._full_weights()

    def _full_weights(self) -> dict[str, torch.Tensor]:
        deepspeed = _deepspeed()
        module = self._live_engine().module
        main = self.is_main_process
        gather = (
            deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
            if self.stage == 3
            else contextlib.nullcontext()
        )
        with gather:
            named = module.state_dict(keep_vars=True)
            masters: dict[int, torch.Tensor] = {}
            if self.compute_dtype is not None:
                from deepspeed.utils import safe_get_full_fp32_param

                for param in module.parameters():  # a collective per parameter, in order
                    full = safe_get_full_fp32_param(param)
                    if full is not None:
                        masters[id(param)] = full
            if not main:
                return {}
            return {
                name: masters.get(id(value), value).detach().to("cpu", copy=True)
                for name, value in named.items()
            }

    def load_model_state_dict(
        self, model: nn.Module, state: Mapping[str, torch.Tensor], *, sharded: bool = False
    ) -> None:
        """Sharded: nothing to do, the engine read its checkpoint. Full: not supported."""
        if sharded:
            return
        if self._engine is None:
            self.unwrap_model(model).load_state_dict(state)
            return
        raise TreadleError(
            "strategy 'deepspeed' cannot load whole weights into a running engine (its fp32 "
            "master weights and partitions would disagree); load them before training with "
            "treadle.load_weights(model, path), or resume from a checkpoint='deepspeed' checkpoint"
        )

    def optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, *, sharded: bool = False
    ) -> dict[str, Any]:
        if sharded:
            return {"deepspeed": "in model/, the engine's checkpoint"}
        raise TreadleError(
            "strategy 'deepspeed': the optimizer state is partitioned inside the engine; save "
            "with checkpoint='deepspeed'"
        )

    def load_optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, state: Mapping[str, Any], *, sharded: bool = False
    ) -> None:
        if not sharded:
            raise TreadleError(
                "strategy 'deepspeed' resumes only from checkpoint='deepspeed' checkpoints"
            )

    def _save_engine(self, folder: Path) -> None:
        engine = self._live_engine()
        engine.save_checkpoint(str(folder), tag=f"global_step{engine.global_steps}")

    def _load_engine(self, folder: Path) -> None:
        from treadle.plugins.checkpoint.deepspeed_format import weights_only_loads

        with weights_only_loads():
            path, _ = self._live_engine().load_checkpoint(
                str(folder), load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if path is None:
            raise TreadleError(f"DeepSpeed found no checkpoint to load in {folder}")
        self._live_engine().set_gradient_accumulation_boundary(True)


# ---------------------------------------------------------------------- helpers


def _read_config(config: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if not isinstance(config, str | Path):
        raise ConfigError(
            f"strategy 'deepspeed': config={config!r} must be the path of a DeepSpeed JSON "
            "file or a mapping"
        )
    path = Path(config)
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"strategy 'deepspeed': cannot read the DeepSpeed config {path}: {exc}"
        ) from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"strategy 'deepspeed': {path} does not hold a JSON object")
    return loaded


def _per_device_batch(run: Run) -> int | None:
    size = getattr(run.train_data, "batch_size", None)
    if isinstance(size, int):
        return size
    configured: int | None = run.config.batch_size
    return configured


def _cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: _cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_cast_floats(v, dtype) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_cast_floats(v, dtype) for v in batch)
    return batch


@contextlib.contextmanager
def _not_boundary(engine: Any) -> Iterator[None]:
    engine.set_gradient_accumulation_boundary(False)
    try:
        yield
    finally:
        engine.set_gradient_accumulation_boundary(True)


def _scale_gradients(engine: Any, factor: torch.Tensor | float) -> None:
    """Multiply every gradient the engine holds (partitioned or not) by ``factor``.

    Scaling is elementwise, so each rank scales only what it holds, without communication:
    ``param.grad`` where the engine keeps gradients whole (stage 0), this rank's partition
    under ZeRO 3 (DeepSpeed's local gradient API), this rank's fragment under ZeRO 1 and 2.
    Anything else goes through DeepSpeed's full-gradient API (a reduction per parameter).
    """
    from deepspeed.utils import (
        safe_get_local_grad,
        safe_set_local_grad,
        safe_update_full_grad_vectorized,
    )

    def scaled(grad: torch.Tensor) -> torch.Tensor:
        if isinstance(factor, torch.Tensor):
            return (grad.double() * factor.to(grad.device)).to(grad.dtype)
        return grad * factor

    remaining = []
    for param in engine.module.parameters():
        if not param.requires_grad:
            continue
        if param.grad is not None:  # DeepSpeed's own rule: a present .grad is authoritative
            param.grad.copy_(scaled(param.grad))
        elif hasattr(param, "ds_id"):  # ZeRO 3
            local = safe_get_local_grad(param)
            if local is not None:
                safe_set_local_grad(param, scaled(local))
        elif hasattr(param, "_hp_mapping"):  # ZeRO 1 and 2
            mapping = param._hp_mapping
            if mapping is None:
                continue  # no part of this parameter's gradient lives on this rank
            fragment = getattr(mapping, "get_lp_grad_fragment", None)
            if fragment is None:
                remaining.append(param)
                continue
            part = fragment(param._index_in_param_group)
            part.copy_(scaled(part))
        else:
            remaining.append(param)
    if remaining:
        safe_update_full_grad_vectorized(remaining, lambda grad, _: scaled(grad))


def _as_cpu_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """An Adam/AdamW as ``DeepSpeedCPUAdam`` with the same groups and hyperparameters."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return optimizer
    groups = optimizer.param_groups
    if any(g.get("amsgrad") or g.get("maximize") or g.get("capturable") for g in groups):
        warnings.warn(
            "strategy 'deepspeed': DeepSpeedCPUAdam has no amsgrad/maximize; the torch "
            "optimizer steps on CPU instead",
            TreadleWarning,
            stacklevel=3,
        )
        return optimizer
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    defaults = optimizer.defaults
    return DeepSpeedCPUAdam(  # type: ignore[no-any-return]
        [
            {k: v for k, v in g.items() if k in ("params", "lr", "betas", "eps", "weight_decay")}
            for g in groups
        ],
        lr=defaults["lr"],
        betas=defaults["betas"],
        eps=defaults["eps"],
        weight_decay=defaults["weight_decay"],
        adamw_mode=isinstance(optimizer, torch.optim.AdamW),
    )


def launch_argv(argv: Sequence[str]) -> list[str]:
    """The DeepSpeed launcher's argv for ``treadle launch --launcher deepspeed [deepspeed
    options] RUN.toml [run options]``: its options pass through unchanged, and each process
    runs ``python -m treadle run RUN.toml [run options]`` (without a ``--local_rank``
    argument; the rank is in the environment, as for torchrun).
    """
    require("deepspeed", extra="deepspeed", what="treadle launch --launcher deepspeed")
    from deepspeed.launcher import runner

    args = runner.parse_args(list(argv))
    if args.module or args.no_python:
        raise ConfigError(
            "treadle launch starts `python -m treadle run RUN.toml`; the deepspeed launcher's "
            "--module and --no_python do not apply (use `deepspeed` directly for another program)"
        )
    tail = [args.user_script, *args.user_args]
    flags = list(argv)[: len(argv) - len(tail)]
    return [*flags, "--no_local_rank", "--module", "treadle", "run", *tail]
