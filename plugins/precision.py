"""Precision plugins (entry-point group ``treadle.precision``).

=============  ===============================  =========================================
name           parameters and optimizer state   forward
=============  ===============================  =========================================
``fp32``       float32                          float32
``fp64``       float64 (inputs cast too)        float64
``fp16-mixed`` float32                          ``torch.autocast`` float16, dynamic loss
                                                scaling (``torch.amp.GradScaler``)
``bf16-mixed`` float32                          ``torch.autocast`` bfloat16, no scaling
``bf16-true``  bfloat16 (inputs cast too)       bfloat16
``fp16-true``  float16 (inputs cast too)        float16, no scaling
=============  ===============================  =========================================

Every plugin takes ``tf32``: ``True`` lets float32 matmuls and convolutions on CUDA use
TensorFloat-32 (``torch.set_float32_matmul_precision("high")`` and
``torch.backends.cudnn.allow_tf32``), ``False`` forbids it, ``None`` (the default) leaves
torch's process-wide setting alone. It is applied when the run sets up its device.

Decisions:

* Gradients reach ``on_before_optimizer_step`` unscaled: ``unscale_gradients`` calls
  ``GradScaler.unscale_`` (which also records whether any gradient is inf/NaN); the strategy
  then divides them by the accumulation window, which keeps inf as inf and NaN as NaN, so the
  scaler's verdict is still right. ``GradScaler.step`` sees the optimizer already unscaled and
  only steps, or skips when an inf/NaN was found; the kernel then counts the skip in
  ``run.state.skipped_steps``, does not step the scheduler, and zeroes the gradients as usual.
* fp16-mixed logs ``loss_scale`` and ``skipped_steps`` at each step its scaler skipped (the
  skip decision already cost a host-device synchronisation, so the log costs nothing more).
* A step dropped by a plugin (``run.skip_step``) never reaches ``optimizer_step``; the scaler is
  still updated from what ``unscale_`` found (in ``on_after_optimizer_step``), so its state is
  ready for the next step and a NaN there still halves the scale.
* The scaler comes from the strategy (``Strategy.grad_scaler``), which knows how gradients are
  sharded: every rank must see an inf/NaN that any rank's shard holds, so that all skip the
  step alike. torch's ``GradScaler`` serves ``single``, ``ddp`` and ``fsdp`` (FSDP2's gradient
  shards are DTensors, whose inf check torch reduces over the ranks).
* The scaler's state (scale, growth tracker, factors) is plain numbers: it is written to the
  checkpoint's ``precision.json`` and restored on resume.
* Support is checked twice: when the run is composed, against the strategy's device (so a bad
  combination fails before any compute), and again when the strategy has chosen the device.
* The ``-true`` plugins and ``fp64`` also make their dtype torch's default dtype during the
  forward pass and loss (Lightning does the same), so tensors a model creates on the fly match
  its parameters.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from treadle.components import Precision, Strategy
from treadle.errors import ConfigError, TreadleWarning
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["FP32", "FP64", "BF16Mixed", "BF16True", "FP16Mixed", "FP16True"]


class _Precision(Precision):
    """Shared: the ``tf32`` option and the device check at compose and set-up time."""

    def __init__(self, tf32: bool | None = None) -> None:
        if tf32 is not None and not isinstance(tf32, bool):
            raise ConfigError(
                f"precision {self.name!r} option tf32 = {tf32!r} is not allowed: "
                "expected True, False or None (leave torch's setting alone)"
            )
        self.tf32 = tf32

    def check_device(self, device: torch.device) -> None:
        """Raise ``ConfigError`` if this precision cannot run on ``device``."""

    def setup(self, device: torch.device) -> None:
        self.check_device(device)
        super().setup(device)
        if self.tf32 is None:
            return
        if device.type != "cuda":
            warnings.warn(
                f"precision {self.name!r}: tf32={self.tf32} has no effect on a "
                f"{device.type!r} device (TensorFloat-32 is a CUDA feature)",
                TreadleWarning,
                stacklevel=2,
            )
            return
        # the legacy flags, not the newer ``fp32_precision`` ones: torch raises if both kinds
        # are mixed in one process, and these are the ones user code and libraries still set
        torch.set_float32_matmul_precision("high" if self.tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = self.tf32

    @hookimpl
    def on_init_end(self, run: Run) -> None:
        self.check_device(run.strategy.device)


class FP32(_Precision):
    """Full float32: no conversion, no autocast, no loss scaling.

    Args:
        tf32: allow TensorFloat-32 matmuls on CUDA (``None``: leave torch's setting alone).
    """

    name = "fp32"


class _TrueDtype(_Precision):
    """Parameters, optimizer state and floating-point inputs all in ``dtype``."""

    dtype: ClassVar[torch.dtype]

    def convert_module(self, model: nn.Module) -> nn.Module:
        return model.to(dtype=self.dtype)

    def convert_input(self, batch: Any) -> Any:
        return _cast_floating(batch, self.dtype)

    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        return _default_dtype(self.dtype)


class FP64(_TrueDtype):
    """Float64 throughout: parameters, optimizer state, floating-point inputs and forward.

    For numerics checks and small scientific models. Not available on MPS.

    Args:
        tf32: as for ``fp32`` (has no effect on float64 matmuls).
    """

    name = "fp64"
    dtype = torch.float64

    def check_device(self, device: torch.device) -> None:
        if device.type == "mps":
            raise ConfigError("precision 'fp64': the MPS device has no float64 support")


class BF16True(_TrueDtype):
    """Bfloat16 throughout, no master copy in float32 (halves memory; coarser updates).

    Args:
        tf32: as for ``fp32``.
    """

    name = "bf16-true"
    dtype = torch.bfloat16

    def check_device(self, device: torch.device) -> None:
        if device.type == "cuda" and torch.cuda.is_available() and not _cuda_bf16(device):
            raise ConfigError(
                f"precision 'bf16-true': the CUDA device {device} has no bfloat16 support; "
                "use 'fp16-mixed' or 'fp32'"
            )


class FP16True(_TrueDtype):
    """Float16 throughout, no loss scaling and no float32 master weights.

    Small gradients underflow to zero and large activations overflow: prefer ``fp16-mixed``
    for training; this exists for inference-like fine-tuning and for parity with other
    trainers.

    Args:
        tf32: as for ``fp32``.
    """

    name = "fp16-true"
    dtype = torch.float16


class _Autocast(_Precision):
    """Float32 parameters; the forward pass and loss run under ``torch.autocast(dtype)``."""

    dtype: ClassVar[torch.dtype]

    def check_device(self, device: torch.device) -> None:
        problem = _autocast_problem(device, self.dtype)
        if problem is not None:
            raise ConfigError(f"precision {self.name!r} cannot run on device {device}: {problem}")

    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


class BF16Mixed(_Autocast):
    """Autocast to bfloat16 on CPU or CUDA; float32 weights; no loss scaling (bfloat16 has
    float32's exponent range, so gradients do not underflow).

    Args:
        tf32: as for ``fp32`` (applies to the operations autocast leaves in float32).
    """

    name = "bf16-mixed"
    dtype = torch.bfloat16


class FP16Mixed(_Autocast):
    """Autocast to float16 with dynamic loss scaling (the strategy's ``grad_scaler()``, a
    ``torch.amp.GradScaler`` by default).

    The loss is multiplied by the scale before backward; gradients are unscaled before
    ``on_before_optimizer_step``. A step whose gradients hold an inf or NaN is skipped, the
    scale is multiplied by ``backoff_factor``, and ``run.state.skipped_steps`` counts it; after
    ``growth_interval`` clean steps in a row the scale is multiplied by ``growth_factor``.

    Args:
        init_scale: the first loss scale.
        growth_factor: scale multiplier after ``growth_interval`` clean steps (> 1).
        backoff_factor: scale multiplier after a step with inf/NaN gradients (in (0, 1)).
        growth_interval: clean steps in a row before the scale grows (>= 1).
        tf32: as for ``fp32`` (applies to the operations autocast leaves in float32).
    """

    name = "fp16-mixed"
    dtype = torch.float16
    #: read by ``numeric-guard``: a step with non-finite gradients is already skipped here.
    skips_nonfinite_steps: ClassVar[bool] = True

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        tf32: bool | None = None,
    ) -> None:
        super().__init__(tf32=tf32)
        for option, value in (("init_scale", init_scale), ("growth_factor", growth_factor)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise _invalid(option, value, "expected a number > 0")
        if growth_factor <= 1:
            raise _invalid("growth_factor", growth_factor, "expected a number > 1")
        if (
            isinstance(backoff_factor, bool)
            or not isinstance(backoff_factor, int | float)
            or not 0 < backoff_factor < 1
        ):
            raise _invalid("backoff_factor", backoff_factor, "expected a number in (0, 1)")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int):
            raise _invalid("growth_interval", growth_interval, "expected an integer >= 1")
        if growth_interval < 1:
            raise _invalid("growth_interval", growth_interval, "expected an integer >= 1")
        self.init_scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.scaler: torch.amp.GradScaler | None = None
        self._strategy: Strategy | None = None  # the run's: it makes the scaler
        self._pending_state: dict[str, Any] | None = None
        self._unscaled = False  # unscale_ ran, update() has not: the step is still open
        self._skipped = False  # the last optimizer_step was skipped by the scaler

    def check_device(self, device: torch.device) -> None:
        super().check_device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            return  # reported by the strategy, which chose the device
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scaler = torch.amp.GradScaler(device.type, enabled=True)
        if not scaler.is_enabled():
            reason = "; ".join(str(w.message) for w in caught) or "GradScaler is disabled there"
            raise ConfigError(
                f"precision 'fp16-mixed' needs loss scaling on device {device}: {reason}"
            )

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        if self.scaler is not None:  # set up again (a second run sharing it): keep its state
            return
        options: dict[str, Any] = {
            "init_scale": self.init_scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
        }
        if self._strategy is not None:
            self.scaler = self._strategy.grad_scaler(**options)
        else:  # set up outside a run
            self.scaler = torch.amp.GradScaler(device.type, **options)
        if self._pending_state is not None:
            self.scaler.load_state_dict(self._pending_state)
            self._pending_state = None

    @property
    def scale(self) -> float:
        """The current loss scale (a host-device synchronisation on an accelerator)."""
        if self.scaler is None:
            state = self._pending_state
            return float(state["scale"]) if state else self.init_scale
        return float(self.scaler.get_scale())

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self._ready().scale(loss)

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        self._ready().unscale_(optimizer)
        self._unscaled = True

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        scaler = self._ready()
        # after our unscale_, GradScaler.step only steps or skips (it never unscales twice)
        scaler.step(optimizer)
        # read before update(), which clears the per-optimizer record; step() already
        # synchronised on it, so .item() costs no further wait
        found_inf = sum(float(v.item()) for v in scaler._found_inf_per_device(optimizer).values())
        scaler.update()
        self._unscaled = False
        self._skipped = found_inf > 0
        return not self._skipped

    @hookimpl
    def on_init_end(self, run: Run) -> None:
        super().on_init_end(run)
        self._strategy = run.strategy

    @hookimpl
    def on_after_optimizer_step(self) -> None:
        if self._unscaled:  # a plugin dropped the step (run.skip_step): close it
            self._ready().update()
            self._unscaled = False

    @hookimpl
    def on_step_end(self, run: Run) -> None:
        if self._skipped:
            self._skipped = False
            run.log({"loss_scale": self.scale, "skipped_steps": run.state.skipped_steps})

    def state_dict(self) -> dict[str, Any]:
        if self.scaler is None:
            return dict(self._pending_state or {})
        return dict(self.scaler.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if self.scaler is None:
            self._pending_state = dict(state)
        else:
            self.scaler.load_state_dict(dict(state))

    def _ready(self) -> torch.amp.GradScaler:
        if self.scaler is None:
            raise ConfigError("precision 'fp16-mixed' was used before setup(device)")
        return self.scaler


# ---------------------------------------------------------------- helpers


def _invalid(option: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(
        f"precision 'fp16-mixed' option {option} = {value!r} is not allowed: {allowed}"
    )


def _autocast_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``torch.autocast(device.type, dtype)`` would not work, or None if it would."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return None  # reported by the strategy, which chose the device
    if not torch.amp.is_autocast_available(device.type):
        return f"torch has no autocast for device type {device.type!r}"
    # torch disables an unsupported autocast with a warning (CPU, MPS) or raises (CUDA bf16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            context = torch.autocast(device_type=device.type, dtype=dtype)
        except RuntimeError as exc:
            return str(exc)
    if not getattr(context, "_enabled", True):
        return "; ".join(str(w.message) for w in caught) or f"{dtype} autocast is disabled there"
    return None


def _cuda_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported())


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _cast_floating(batch: Any, dtype: torch.dtype) -> Any:
    """Cast every floating-point tensor in a nested batch; ids, masks and labels stay as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: _cast_floating(v, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_cast_floating(v, dtype) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_cast_floating(v, dtype) for v in batch)
    return batch
