"""``ema``: an exponential moving average of the weights, for evaluation and export.

After every ``every``-th optimizer step (``run.state.step % every == 0``) the plugin updates a
copy of the trainable parameters::

    ema = decay * ema + (1 - decay) * weights        # torch._foreach_lerp_(ema, weights, 1 - decay)

Warm-up: during the first ``warmup_steps`` optimizer steps the average *is* the weights
(``ema = weights`` at each update), so the early, random weights do not linger in it; averaging
starts after step ``warmup_steps``. (This is a plain start delay; the ``(1 + n) / (10 + n)``
decay ramp of TensorFlow and timm is not offered.)

* **Where it lives**: one tensor per trainable parameter (``requires_grad``; frozen ones never
  change), of the parameter's dtype, on the parameter's device, created at the first ``fit``
  from the weights then. The update is one ``_foreach`` kernel and reads nothing back to the
  host. Under bf16/fp16 weights (``"bf16-true"``) the average is kept in that dtype, which
  loses small updates: use mixed precision (float32 weights) for a faithful average. Buffers
  (BatchNorm statistics) are not averaged: evaluation uses the model's.
* **Sharded strategies** (FSDP): each rank averages its local shards. For checkpoints the
  shards are gathered (``DTensor.full_tensor``) and scattered back on load; this path has not
  been tested across processes yet.
* **Evaluation** (``use_for_eval=True``): at ``on_eval_begin`` the average is copied into the
  model and the live weights kept aside; at ``on_eval_end`` (or ``on_exception``) they are
  put back, so training continues on the live weights. Costs one extra copy of the trainable
  weights during evaluation. Before the first ``fit`` there is no average: evaluation uses the
  weights.
* **Checkpoints**: the average and the update count are saved under the key ``"ema"``; a run
  resumed mid-way ends with the same average, bit for bit, as an uninterrupted one. A
  checkpoint without it (the plugin was added later) starts the average from the resumed
  weights, with a warning.
* **Export**, on request: ``ema.ema_state_dict()`` is the model's ``state_dict`` with the
  averaged parameters in place of the live ones (save it with safetensors or ``torch.save``);
  ``ema.copy_to(model)`` loads the average into a model. ``apply_at_end=True`` copies the
  average into the run's model when a ``fit`` ends (before ``fit`` returns; after the fit's
  final checkpoint), so ``run.save()`` and ``treadle export`` then write the averaged weights;
  training further would continue from them.

Options:

* ``decay`` (float, default ``0.999``): ``0 < decay < 1``; the average's horizon is about
  ``every / (1 - decay)`` steps.
* ``every`` (int, default ``1``): update after every N-th optimizer step.
* ``warmup_steps`` (int, default ``0``): optimizer steps during which the average copies the
  weights.
* ``use_for_eval`` (bool, default ``True``): evaluate with the averaged weights.
* ``apply_at_end`` (bool, default ``False``): leave the averaged weights in the model after
  each ``fit``.

Equivalents: HF Trainer has none (use a callback); Lightning: ``WeightAveraging`` /
``StochasticWeightAveraging`` callbacks with ``torch.optim.swa_utils.AveragedModel``; timm's
``ModelEmaV3``.

Example::

    ema = EMA(decay=0.999, warmup_steps=100)
    run = treadle.Run(model=model, train_data=loader, eval_data=val, plugins=[ema])
    run.fit()
    torch.save(ema.ema_state_dict(), "ema.pt")
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from treadle.errors import ConfigError, TreadleError, TreadleWarning
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["EMA"]


def _invalid(option: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"ema option {option} = {value!r} is not allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class EMA:
    """Keep an exponential moving average of the trainable weights.

    Args:
        decay: the weight of the old average at each update, ``0 < decay < 1``.
        every: update after every ``every``-th optimizer step (>= 1).
        warmup_steps: optimizer steps during which the average copies the weights (>= 0).
        use_for_eval: evaluate with the averaged weights.
        apply_at_end: copy the average into the model when a fit ends.
    """

    name: ClassVar[str] = "ema"

    def __init__(
        self,
        decay: float = 0.999,
        every: int = 1,
        warmup_steps: int = 0,
        use_for_eval: bool = True,
        apply_at_end: bool = False,
    ) -> None:
        if (
            isinstance(decay, bool)
            or not isinstance(decay, int | float)
            or not math.isfinite(decay)
            or not 0 < decay < 1
        ):
            raise _invalid("decay", decay, "expected a number with 0 < decay < 1, e.g. 0.999")
        if not _is_int(every) or every < 1:
            raise _invalid("every", every, "expected an integer >= 1 (optimizer steps)")
        if not _is_int(warmup_steps) or warmup_steps < 0:
            raise _invalid("warmup_steps", warmup_steps, "expected an integer >= 0")
        for option, value in (("use_for_eval", use_for_eval), ("apply_at_end", apply_at_end)):
            if not isinstance(value, bool):
                raise _invalid(option, value, "expected True or False")
        self.decay = float(decay)
        self.every = every
        self.warmup_steps = warmup_steps
        self.use_for_eval = use_for_eval
        self.apply_at_end = apply_at_end
        #: number of updates made so far (warm-up copies included).
        self.updates = 0
        self._model: nn.Module | None = None
        self._names: list[str] = []
        self._params: list[torch.Tensor] = []
        self._shadow: list[torch.Tensor] = []
        self._live: list[torch.Tensor] | None = None  # the live weights while evaluating

    def __repr__(self) -> str:
        return (
            f"EMA(decay={self.decay}, every={self.every}, warmup_steps={self.warmup_steps}, "
            f"use_for_eval={self.use_for_eval}, apply_at_end={self.apply_at_end})"
        )

    # ------------------------------------------------------------------ public API

    @property
    def started(self) -> bool:
        """Whether the average exists (from the first ``fit`` on)."""
        return self._model is not None

    def averaged(self) -> dict[str, torch.Tensor]:
        """The averaged parameters by name (the tensors themselves, not copies)."""
        return dict(zip(self._names, self._shadow, strict=True))

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The run's model's ``state_dict`` (detached copies) with the averaged parameters."""
        model = self._started_model()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, tensor in self.averaged().items():
            state[name] = tensor.detach().clone()
        return state

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Copy the averaged parameters into ``model`` (default: the run's model), by name."""
        target = self._started_model() if model is None else model
        params = dict(target.named_parameters())
        missing = [name for name in self._names if name not in params]
        if missing:
            raise TreadleError(
                f"ema.copy_to: {type(target).__name__} has no parameter(s) {missing[:5]}; "
                "pass a model of the same architecture as the run's"
            )
        with torch.no_grad():
            torch._foreach_copy_([params[n] for n in self._names], self._shadow)

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_fit_begin(self, run: Run) -> None:
        self._start(run.model)

    @hookimpl
    def on_step_end(self, run: Run) -> None:
        step = run.state.step
        if step % self.every:
            return
        with torch.no_grad():
            if step <= self.warmup_steps:
                torch._foreach_copy_(self._shadow, self._params)
            else:
                torch._foreach_lerp_(self._shadow, self._params, 1.0 - self.decay)
        self.updates += 1

    @hookimpl
    def on_eval_begin(self) -> None:
        if not self.use_for_eval or not self.started or self._live is not None:
            return
        with torch.no_grad():
            self._live = list(torch._foreach_mul(self._params, 1.0))  # a copy, one kernel
            torch._foreach_copy_(self._params, self._shadow)

    @hookimpl
    def on_eval_end(self) -> None:
        self._restore_live()

    @hookimpl
    def on_exception(self) -> None:
        self._restore_live()

    @hookimpl
    def on_fit_end(self) -> None:
        if self.apply_at_end and self.started:
            self.copy_to()

    @hookimpl
    def on_save_checkpoint(self, plugin_state: MutableMapping[str, Any]) -> None:
        if self.started:
            plugin_state[self.name] = {
                "updates": self.updates,
                "decay": self.decay,
                "weights": {n: _full(t) for n, t in zip(self._names, self._shadow, strict=True)},
            }

    @hookimpl
    def on_load_checkpoint(self, run: Run, plugin_state: Mapping[str, Any]) -> None:
        self._start(run.model)
        state = plugin_state.get(self.name)
        if state is None:
            warnings.warn(
                "ema: the checkpoint holds no moving average (it was written without the ema "
                "plugin); the average starts from the resumed weights",
                TreadleWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                torch._foreach_copy_(self._shadow, self._params)
            return
        weights = state["weights"]
        if sorted(weights) != sorted(self._names):
            raise TreadleError(
                "ema: the checkpoint's moving average is of other parameters than the model's "
                f"trainable ones (checkpoint: {len(weights)}, model: {len(self._names)}; e.g. "
                f"{sorted(set(weights) ^ set(self._names))[:3]}); was requires_grad changed?"
            )
        with torch.no_grad():
            for name, shadow in zip(self._names, self._shadow, strict=True):
                shadow.copy_(_local(weights[name], shadow))
        self.updates = int(state["updates"])

    # ------------------------------------------------------------------ internals

    def _start(self, model: nn.Module) -> None:
        if self._model is model:
            return
        if self._model is not None:
            raise TreadleError("ema: one EMA instance averages one model; create another")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError("ema: the model has no trainable parameter to average")
        self._model = model
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        with torch.no_grad():
            self._shadow = [p.detach().clone() for p in self._params]

    def _started_model(self) -> nn.Module:
        if self._model is None:
            raise TreadleError("ema: there is no average before the run's first fit()")
        return self._model

    def _restore_live(self) -> None:
        if self._live is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._params, self._live)
            self._live = None


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every rank saves), else the tensor."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor.full_tensor()  # type: ignore[attr-defined, no-any-return]
    return tensor


def _local(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: sharded the same way for a DTensor, else on its device."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(like, dtensor):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(
            full.to(like.device),
            like.device_mesh,  # type: ignore[attr-defined]
            like.placements,  # type: ignore[attr-defined]
        )
    return full.to(like.device)
