"""``fsdp``: torch's FSDP2 (``torch.distributed.fsdp.fully_shard``), parameters sharded over ranks.

Each rank keeps 1/N of every parameter, gradient and optimizer state (as ``DTensor`` shards);
a wrapped block's parameters are all-gathered for its forward and backward and its gradients
reduce-scattered. Blocks are chosen by module class name (``wrap``), by size
(``min_num_params``), or from the model's ``_no_split_modules`` (the transformers
convention); the root module is always sharded last.

Checkpoints: with ``checkpoint="dcp"`` every rank writes its own shards
(torch.distributed.checkpoint; resumable with another number of ranks); with a whole-file
format ("safetensors") the full state is gathered to the main process's CPU and written there.
A ``dcp`` checkpoint exports to a plain safetensors model with ``treadle.plugins.export.export``.

Meta-device initialisation: a model built inside ``strategy.model_init_context()`` has its
parameters on the ``meta`` device (no memory). ``wrap_model`` shards it, gives each rank memory
for its own shards only (``to_empty``), and initialises the weights (``init_weights``): each
module's own parameters and buffers are initialised as full-size temporaries on the device, one
module at a time, under a generator seeded with ``init_seed`` (default: ``Config.seed``), and
each rank keeps its slice. So every rank agrees, a run is reproducible, and on CPU the weights
equal those of the model built normally after ``torch.manual_seed(seed)`` (for modules built in
the order they are registered, as usual). Peak extra memory: the largest single module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from treadle.errors import ConfigError
from treadle.hookspecs import hookimpl
from treadle.plugins.strategies._distributed import TorchDistributed, module_classes, parse_dtype

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["FSDPStrategy", "reset_parameters"]

#: ``init_weights`` value: leave a meta-built model's weights unset (NaN) for a later load
_NO_INIT = "none"
_DEFAULT_INIT = "reset_parameters"


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
        init_weights: how a model built in ``model_init_context()`` (on the meta device) gets
            its weights once sharded: ``"reset_parameters"`` (call each module's
            ``reset_parameters()``, as torch.nn's layers do when built normally), a function
            ``f(module)`` (or ``"pkg.module:function"`` in a run file) that initialises one
            module's own parameters and buffers (``recurse=False``), or ``"none"`` (leave them
            NaN: the weights are loaded afterwards, by ``resume`` or
            ``strategy.load_model_state_dict``). Unused for a model not built on meta.
        init_seed: seed of the generator the initialisation draws from (None: ``Config.seed``).
        backend, timeout, device: as for ``ddp``; with ``cpu_offload`` on an accelerator,
            backend "auto" is ``"<device>:nccl,cpu:gloo"`` (offloaded gradients are reduced on CPU).

    Raises:
        ConfigError: ``wrap`` and ``min_num_params`` together, an unknown dtype, an invalid
            ``init_weights``, or a torch without FSDP2; when the run is composed, a meta
            model with a module that ``init_weights="reset_parameters"`` cannot initialise.

    Example::

        strategy={"name": "fsdp", "wrap": ["Block"], "param_dtype": "bfloat16",
                  "reduce_dtype": "float32"}

        strategy = FSDPStrategy(wrap=["Block"])
        with strategy.model_init_context():   # parameters on "meta": no memory
            model = Transformer(config)
        treadle.Run(model, strategy=strategy, ...)  # sharded, then each rank's shards initialised
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
        init_weights: Callable[[nn.Module], Any] | str = _DEFAULT_INIT,
        init_seed: int | None = None,
        backend: str = "auto",
        timeout: float | None = None,
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
        if init_seed is not None and (
            isinstance(init_seed, bool) or not isinstance(init_seed, int) or init_seed < 0
        ):
            raise ConfigError(
                f"strategy 'fsdp': init_seed={init_seed!r} must be a non-negative integer, or "
                "None for the run's Config.seed"
            )
        self.cpu_offload = cpu_offload
        self.sync_module_states = sync_module_states
        self.init_weights = init_weights
        self._init_fn = _resolve_init(init_weights)
        self.init_seed = init_seed
        self._run_seed: int | None = None
        self._model: nn.Module | None = None

    # ------------------------------------------------------------------ set-up

    def setup(self, run: Run) -> None:
        """Join the process group; remember ``Config.seed`` for meta-device initialisation."""
        self._run_seed = run.config.seed
        super().setup(run)

    def _backend_for(self, device: torch.device) -> str | None:
        """With ``cpu_offload`` on an accelerator, a CPU backend beside the device's: the
        offloaded gradient shards are reduced where they live (the clipping norm, the fp16
        inf check), which NCCL cannot do (torchtitan pairs them the same way)."""
        backend = super()._backend_for(device)
        if self.cpu_offload and self.backend == "auto" and device.type != "cpu" and backend:
            return f"{device.type}:{backend},cpu:gloo"
        return backend

    @hookimpl
    def on_init_end(self, run: Run) -> None:
        """Before any compute: a meta-built model must be something ``init_weights`` can fill."""
        _check_initialisable(run.model, self._init_fn)

    def model_init_context(self) -> contextlib.AbstractContextManager[Any]:
        """Build the model on the ``meta`` device: shapes only, no memory, no random numbers.

        ``wrap_model`` then shards it, materialises each rank's shards on the device and
        initialises them (``init_weights``).
        """
        return torch.device("meta")

    # ------------------------------------------------------------------ wrapping

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Shard the chosen blocks, then the root; the model is changed in place and returned.

        A model with tensors on the meta device is sharded as it is, then each rank's shards
        are materialised and initialised (``init_weights``); its other tensors keep their values.
        """
        fsdp = _fsdp()
        from torch.distributed.device_mesh import init_device_mesh

        model = self.precision.convert_module(model)
        pending = _meta_tensors(model)
        if pending:
            _check_initialisable(model, self._init_fn)
            _move_real_tensors(model, self.device)  # ``model.to`` fails on meta tensors
        else:
            model = model.to(self.device)
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
        if pending:
            self._materialise(model, pending)
        self._model = model
        return model

    def _materialise(self, model: nn.Module, pending: list[_MetaTensors]) -> None:
        """Give every meta tensor memory on this rank (its shard only), then initialise it.

        ``to_empty`` replaces every tensor, so the values of the ones that were not on meta
        are kept aside and put back.
        """
        kept = [
            (module, name, tensor.detach().clone())
            for module in model.modules()
            for name, tensor in [
                *module._parameters.items(),
                *module._buffers.items(),
            ]
            if tensor is not None and not tensor.is_meta
        ]
        # CPU offload keeps the shards in CPU memory; FSDP moves them for compute
        model.to_empty(device=torch.device("cpu") if self.cpu_offload else self.device)
        with torch.no_grad():
            for module, name, value in kept:  # by name: to_empty replaces buffer objects
                getattr(module, name).copy_(value)
        del kept
        seed = self.init_seed if self.init_seed is not None else (self._run_seed or 0)
        devices = [self.device] if self.device.type != "cpu" else []
        # forked: initialising leaves the run's random stream where set-up put it
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(seed)
            done: set[int] = set()
            for entry in pending:
                _initialise(entry, self._init_fn, self.device, done)

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


# ------------------------------------------------------------------ meta-device initialisation


def reset_parameters(module: nn.Module) -> None:
    """The default ``init_weights``: ``module.reset_parameters()``, as torch.nn layers call
    when built normally (a module without one must hold no parameters or buffers)."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


class _MetaTensors:
    """One module and the names of its own parameters and buffers that were on meta."""

    __slots__ = ("buffers", "module", "name", "params")

    def __init__(self, name: str, module: nn.Module, params: list[str], buffers: list[str]):
        self.name, self.module, self.params, self.buffers = name, module, params, buffers


def _resolve_init(value: Any) -> Callable[[nn.Module], Any] | None:
    """The function ``init_weights`` names (None for ``"none"``)."""
    if value == _DEFAULT_INIT:
        return reset_parameters
    if value == _NO_INIT:
        return None
    if isinstance(value, str) and ":" in value:
        from treadle.registry import import_path

        value = import_path(value)
    if not callable(value):
        raise ConfigError(
            f"strategy 'fsdp': init_weights={value!r} is not allowed; give "
            f"{_DEFAULT_INIT!r}, {_NO_INIT!r} (weights loaded later), a function f(module) or "
            "'package.module:function'"
        )
    return value  # type: ignore[no-any-return]


def _meta_tensors(model: nn.Module) -> list[_MetaTensors]:
    """The modules owning meta tensors, in ``model.modules()`` order (construction order for
    the usual model, so the initialisation draws random numbers in the same order)."""
    found = []
    for name, module in model.named_modules():
        params = [n for n, p in module.named_parameters(recurse=False) if p.is_meta]
        buffers = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if params or buffers:
            found.append(_MetaTensors(name, module, params, buffers))
    return found


def _check_initialisable(model: nn.Module, init: Callable[[nn.Module], Any] | None) -> None:
    """With the default ``init_weights``, every module owning meta tensors needs
    ``reset_parameters``; with ``"none"`` no meta buffer may be non-persistent (no checkpoint
    holds it, so no load would set it); a custom function is trusted."""
    if init is None:
        transient = [
            f"{entry.name or '(root)'}.{name}"
            for entry in _meta_tensors(model)
            for name in entry.buffers
            if name in entry.module._non_persistent_buffers_set
        ]
        if transient:
            raise ConfigError(
                "strategy 'fsdp': init_weights='none' leaves a meta model's tensors for a "
                "later load, but these buffers are non-persistent (in no state dict, so no "
                f"load sets them): {', '.join(transient)}. Give init_weights a function "
                "f(module) (or keep 'reset_parameters') so that they are computed"
            )
        return
    if init is not reset_parameters:
        return
    missing = [
        f"{entry.name or '(root)'} ({type(entry.module).__name__}: "
        f"{', '.join(entry.params + entry.buffers)})"
        for entry in _meta_tensors(model)
        if not callable(getattr(entry.module, "reset_parameters", None))
    ]
    if missing:
        raise ConfigError(
            "strategy 'fsdp': the model was built on the meta device (model_init_context), "
            "but these modules hold meta parameters or buffers and have no reset_parameters() "
            f"to initialise them: {'; '.join(missing)}. Give the strategy init_weights=f, a "
            "function f(module) that initialises one module's own parameters and buffers "
            "('package.module:function' in a run file), or add reset_parameters() to those "
            "classes, or pass init_weights='none' and load the weights after set-up (resume, "
            "or run.strategy.load_model_state_dict)"
        )


def _move_real_tensors(model: nn.Module, device: torch.device) -> None:
    """Move the tensors that are not on meta to ``device`` (ties kept: same objects)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not tensor.is_meta and tensor.device != device:
                tensor.data = tensor.data.to(device)


def _initialise(
    entry: _MetaTensors,
    init: Callable[[nn.Module], Any] | None,
    device: torch.device,
    done: set[int],
) -> None:
    """Initialise one module's formerly-meta tensors: ``init`` runs on full-size temporaries
    (so it sees the shapes and draws the numbers a normally built module would), then this
    rank copies its own shard of each. A tensor shared by several modules (``done`` holds the
    ones already set) keeps the values of the first; the others still draw theirs, as each
    module does when built normally before the weights are tied."""
    module = entry.module
    targets: dict[str, Any] = {n: module._parameters[n] for n in entry.params}
    buffers: dict[str, Any] = {n: module._buffers[n] for n in entry.buffers}
    if init is None:  # weights come later: NaN makes a forgotten load show at the first step
        with torch.no_grad():
            for tensor in [*targets.values(), *buffers.values()]:
                _local(tensor).fill_(float("nan") if tensor.is_floating_point() else 0)
        return
    for name, param in targets.items():
        module._parameters[name] = nn.Parameter(
            torch.empty(param.shape, dtype=param.dtype, device=device),
            requires_grad=param.requires_grad,
        )
    for name, buffer in buffers.items():
        module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
    try:
        init(module)
        values = {
            **{n: module._parameters[n] for n in targets},
            **{n: module._buffers[n] for n in buffers},
        }
    finally:
        for name, param in targets.items():
            module._parameters[name] = param
        for name, buffer in buffers.items():
            module._buffers[name] = buffer
    with torch.no_grad():
        for name, tensor in {**targets, **buffers}.items():
            value = values[name]
            if value is None or tuple(value.shape) != tuple(tensor.shape):
                raise ConfigError(
                    f"strategy 'fsdp': init_weights replaced {entry.name or '(root)'}.{name} "
                    f"with {None if value is None else tuple(value.shape)}; it must keep the "
                    f"shape {tuple(tensor.shape)}"
                )
            if id(tensor) in done:
                continue
            done.add(id(tensor))
            _local(tensor).copy_(_shard_of(value.detach(), tensor))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's storage of ``tensor``: the local shard of a DTensor, else the tensor."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def _shard_of(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full``, laid out as ``target`` (a DTensor shard, or all of it)."""
    mesh = getattr(target, "device_mesh", None)
    if mesh is None:
        return full
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank cuts its own slice, no communication
    shard = distribute_tensor(full, mesh, target.placements, src_data_rank=None).to_local()
    if shard.shape != _local(target).shape:  # FSDP's layout is DTensor's; check, not assume
        raise RuntimeError(
            f"strategy 'fsdp': shard of shape {tuple(shard.shape)} for a local tensor of "
            f"shape {tuple(_local(target).shape)}"
        )
    return shard


def _broadcast_from_rank0(model: nn.Module) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not tensor.is_meta:
                dist.broadcast(tensor.data, src=0)
