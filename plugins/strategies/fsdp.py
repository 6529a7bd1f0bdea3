"""``fsdp``: torch's FSDP2 (``torch.distributed.fsdp.fully_shard``), parameters sharded over ranks.

Each rank keeps 1/N of every parameter, gradient and optimizer state (as ``DTensor`` shards);
a wrapped block's parameters are all-gathered for its forward and backward and its gradients
reduce-scattered. Blocks are chosen by module class name (``wrap``), by size
(``min_num_params``), or from the model's ``_no_split_modules`` (the transformers
convention); the root module is always sharded last.

Checkpoints: with ``checkpoint="dcp"`` every rank writes its own shards
(torch.distributed.checkpoint; resumable with another number of ranks); with a whole-file
format ("safetensors") the full state is gathered to the main process's CPU and written there.
A ``dcp`` checkpoint exports to a plain safetensors model with ``treadle.checkpoint.export``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from treadle.errors import ConfigError
from treadle.plugins.strategies._distributed import TorchDistributed, module_classes, parse_dtype

__all__ = ["FSDPStrategy"]


def _fsdp() -> Any:
    try:
        from torch.distributed import fsdp
    except ImportError as exc:  # a torch built without distributed support
        raise ConfigError(f"strategy 'fsdp' needs torch.distributed.fsdp: {exc}") from exc
    if not hasattr(fsdp, "fully_shard"):
        raise ConfigError(
            f"strategy 'fsdp' needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
            f"this is torch {torch.__version__}"
        )
    return fsdp


class FSDPStrategy(TorchDistributed):
    """Fully sharded data parallel training with FSDP2.

    Args:
        wrap: module class names (``"TransformerBlock"``, or qualified
            ``"my_pkg.model.Block"``) whose instances are sharded as units. Default: the
            model's ``_no_split_modules`` if it declares them, else only the root.
        min_num_params: instead of ``wrap``, shard every submodule whose parameters not yet
            in a unit number at least this many (bottom-up, like FSDP1's size policy).
        reshard_after_forward: free the gathered parameters after forward (True, ZeRO-3-like),
            keep them until backward (False, ZeRO-2-like), or reshard to groups of this many
            ranks (an int).
        param_dtype: dtype of the gathered parameters for computation ("bfloat16", ...);
            None keeps the parameters' dtype.
        reduce_dtype: dtype in which gradients are reduced (None: ``param_dtype``).
        output_dtype: dtype of the root module's outputs (None: left as computed).
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory.
        sync_module_states: broadcast rank 0's weights before sharding, so ranks start alike
            even if they built the model with different random numbers.
        backend, timeout, device: as for ``ddp``.

    Raises:
        ConfigError: ``wrap`` and ``min_num_params`` together, an unknown dtype, or a torch
            without FSDP2.

    Example::

        strategy={"name": "fsdp", "wrap": ["Block"], "param_dtype": "bfloat16",
                  "reduce_dtype": "float32"}
    """

    name = "fsdp"

    def __init__(
        self,
        *,
        wrap: Sequence[str] | None = None,
        min_num_params: int | None = None,
        reshard_after_forward: bool | int = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        output_dtype: str | None = None,
        cpu_offload: bool = False,
        sync_module_states: bool = True,
        backend: str = "auto",
        timeout: float = 1800.0,
        device: str = "auto",
    ) -> None:
        super().__init__(backend=backend, timeout=timeout, device=device)
        _fsdp()
        if isinstance(wrap, str):
            wrap = [wrap]
        if wrap is not None and (
            not isinstance(wrap, Sequence) or not all(isinstance(w, str) for w in wrap)
        ):
            raise ConfigError(f"strategy 'fsdp': wrap={wrap!r} must be a list of class names")
        if wrap is not None and min_num_params is not None:
            raise ConfigError(
                "strategy 'fsdp': give either wrap (class names) or min_num_params (a size "
                "policy), not both"
            )
        if min_num_params is not None and (
            isinstance(min_num_params, bool)
            or not isinstance(min_num_params, int)
            or min_num_params < 1
        ):
            raise ConfigError(
                f"strategy 'fsdp': min_num_params={min_num_params!r} must be a positive integer"
            )
        if not isinstance(reshard_after_forward, bool | int) or (
            not isinstance(reshard_after_forward, bool) and reshard_after_forward < 1
        ):
            raise ConfigError(
                f"strategy 'fsdp': reshard_after_forward={reshard_after_forward!r} must be "
                "true, false or a positive number of ranks"
            )
        for option, value in (
            ("cpu_offload", cpu_offload),
            ("sync_module_states", sync_module_states),
        ):
            if not isinstance(value, bool):
                raise ConfigError(f"strategy 'fsdp': {option}={value!r} must be true or false")
        self.wrap = list(wrap) if wrap is not None else None
        self.min_num_params = min_num_params
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = parse_dtype(param_dtype, option="param_dtype", strategy="fsdp")
        self.reduce_dtype = parse_dtype(reduce_dtype, option="reduce_dtype", strategy="fsdp")
        self.output_dtype = parse_dtype(output_dtype, option="output_dtype", strategy="fsdp")
        self.cpu_offload = cpu_offload
        self.sync_module_states = sync_module_states
        self._model: nn.Module | None = None

    # ------------------------------------------------------------------ wrapping

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Shard the chosen blocks, then the root; the model is changed in place and returned."""
        fsdp = _fsdp()
        from torch.distributed.device_mesh import init_device_mesh

        model = self.precision.convert_module(model).to(self.device)
        if self.sync_module_states and self.world_size > 1:
            _broadcast_from_rank0(model)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        options: dict[str, Any] = {
            "mesh": mesh,
            "reshard_after_forward": self.reshard_after_forward,
            "mp_policy": fsdp.MixedPrecisionPolicy(
                param_dtype=self.param_dtype,
                reduce_dtype=self.reduce_dtype,
                output_dtype=self.output_dtype,
            ),
        }
        if self.cpu_offload:
            options["offload_policy"] = fsdp.CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        for unit in self._units(model):
            fsdp.fully_shard(unit, **options)
        fsdp.fully_shard(model, **options)
        self._model = model
        return model

    def _units(self, model: nn.Module) -> list[nn.Module]:
        """The submodules to shard as units, innermost first (a unit inside another goes first)."""
        if self.min_num_params is not None:
            return _by_size(model, self.min_num_params)
        names = self.wrap
        if names is None:
            declared = getattr(model, "_no_split_modules", None)
            names = [str(n) for n in declared] if declared else []
        if not names:
            return []
        units = [
            module
            for module in model.modules()
            if module is not model
            and (
                type(module).__name__ in names
                or f"{type(module).__module__}.{type(module).__qualname__}" in names
            )
        ]
        if not units and self.wrap is not None:
            raise ConfigError(
                f"strategy 'fsdp': wrap={self.wrap!r} matches no submodule of "
                f"{type(model).__name__}; its module classes are: "
                f"{', '.join(module_classes(model))}"
            )
        return list(reversed(units))

    # ------------------------------------------------------------------ the step

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """Non-final micro-batches: gradients stay unsharded and local, no reduce-scatter."""
        return _without_gradient_sync(model)

    def clip_grad_norm(
        self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        """Clip by the norm over every shard of every rank; returns that norm (a plain tensor)."""
        norm = nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type=norm_type)
        full = getattr(norm, "full_tensor", None)
        return full() if full is not None else norm

    # ------------------------------------------------------------------ state dicts

    def model_state_dict(
        self, model: nn.Module, *, sharded: bool = False
    ) -> dict[str, torch.Tensor]:
        """Sharded: this rank's DTensor shards. Full: gathered to the main process's CPU."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_options(sharded))

    def load_model_state_dict(
        self, model: nn.Module, state: Mapping[str, torch.Tensor], *, sharded: bool = False
    ) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, dict(state), options=_options(sharded, loading=True))

    def optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, *, sharded: bool = False
    ) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self._wrapped(), optimizer, options=_options(sharded))

    def load_optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, state: Mapping[str, Any], *, sharded: bool = False
    ) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(
            self._wrapped(), optimizer, dict(state), options=_options(sharded, loading=True)
        )

    def _wrapped(self) -> nn.Module:
        if self._model is None:
            raise ConfigError("strategy 'fsdp': the model is not wrapped yet (call run.setup())")
        return self._model

    def _release(self) -> None:
        self._model = None


def _options(sharded: bool, *, loading: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if sharded:
        return StateDictOptions(full_state_dict=False, cpu_offload=False)
    if loading:  # every rank read the whole file: each keeps its own shards of it
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


@contextlib.contextmanager
def _without_gradient_sync(model: nn.Module) -> Iterator[None]:
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is None:  # not sharded (never wrapped): nothing to skip
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def _by_size(model: nn.Module, min_num_params: int) -> list[nn.Module]:
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> int:
        count = sum(p.numel() for p in module.parameters(recurse=False))
        for child in module.children():
            count += visit(child)
        if module is not model and count >= min_num_params:
            units.append(module)  # post-order: children are appended before their parents
            return 0
        return count

    visit(model)
    return units


def _broadcast_from_rank0(model: nn.Module) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not tensor.is_meta:
                dist.broadcast(tensor.data, src=0)
