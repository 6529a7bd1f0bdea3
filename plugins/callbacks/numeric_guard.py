"""``numeric-guard``: act on a non-finite loss or gradient norm before it reaches the weights.

Each micro-batch's loss is checked for NaN/inf on the device as it comes
(``on_micro_step_end``); in ``on_before_optimizer_step`` the guard adds the gradients' norm and
reads the verdict once: one host-device synchronisation per optimizer step. Then, by
``policy``:

* ``"raise"``: raise :class:`NonFiniteError`, naming the step, the micro-batch (its index in
  the accumulation window and the run's micro-step count) and what was non-finite.
* ``"skip"``: drop the step (``run.skip_step``): no optimizer or scheduler step, gradients
  zeroed; ``run.state.skipped_steps`` and the guard's ``skipped`` count it, and
  ``nonfinite_skipped`` (the guard's count) is logged at once.
* ``"stop"``: drop the step too (so the saved weights are the last finite ones), then
  ``run.request_save()`` and ``run.request_stop(reason)``: the loop saves and stops at the step
  boundary.

Decisions:

* The decision is agreed across ranks (a sum all-reduce of the verdict) so every rank skips or
  stops together; a rank names its own micro-batch when it raises.
* Under a precision that skips non-finite gradient steps itself (``fp16-mixed``: loss scaling
  overflows are expected and handled by lowering the scale), gradients are not checked unless
  ``check_grads=True``; the loss is always checked.
* The gradient norm is this rank's 2-norm computed in float32: enough to tell finite from not
  (a sum over ranks of the local verdicts is the global verdict).
* The guard runs first among ``on_before_optimizer_step`` implementations (``tryfirst``), so
  clipping never sees what it is about to drop.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from treadle.errors import ConfigError, TreadleError
from treadle.hookspecs import hookimpl
from treadle.state import LossSum

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["NonFiniteError", "NumericGuard"]

_POLICIES = ("raise", "skip", "stop")


class NonFiniteError(TreadleError, FloatingPointError):
    """A loss or gradient norm was NaN or infinite (``numeric-guard`` with ``policy="raise"``).

    Attributes:
        step: the optimizer step being computed (``run.state.step + 1``: 1 is the first).
        micro_batch: index of the first bad micro-batch in the step's window, or None when only
            the gradient norm was non-finite.
        micro_step: the run's micro-batch count at that micro-batch (1 is the first), or None.
    """

    def __init__(
        self, message: str, step: int, micro_batch: int | None, micro_step: int | None
    ) -> None:
        super().__init__(message)
        self.step = step
        self.micro_batch = micro_batch
        self.micro_step = micro_step


class NumericGuard:
    """Raise, skip the step, or save and stop on a NaN/inf loss or gradient norm.

    Args:
        policy: ``"raise"``, ``"skip"`` or ``"stop"``.
        check_grads: check the gradient norm too. ``None`` (the default): yes, unless the
            precision plugin already skips steps with non-finite gradients (``fp16-mixed``).

    Example::

        treadle.Run(..., plugins=[{"name": "numeric-guard", "policy": "skip"}])
    """

    name: ClassVar[str] = "numeric-guard"
    #: the kernel then does not warn about a non-finite training loss: this plugin acts on it
    treadle_handles_non_finite: ClassVar[bool] = True

    def __init__(self, policy: str = "raise", check_grads: bool | None = None) -> None:
        if policy not in _POLICIES:
            raise ConfigError(
                f"numeric-guard option policy = {policy!r} is not allowed: expected one of "
                f"{', '.join(map(repr, _POLICIES))}"
            )
        if check_grads is not None and not isinstance(check_grads, bool):
            raise ConfigError(
                f"numeric-guard option check_grads = {check_grads!r} is not allowed: "
                "expected True, False or None"
            )
        self.policy = policy
        self.check_grads = check_grads
        #: steps this guard dropped (over the run's life; kept in checkpoints).
        self.skipped = 0
        self._flags: list[torch.Tensor] = []  # per micro-batch: loss is non-finite (on device)
        self._first_micro_step = 0
        self._log_skip = False

    def __repr__(self) -> str:
        return f"NumericGuard(policy={self.policy!r}, check_grads={self.check_grads!r})"

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_step_begin(self, run: Run) -> None:
        self._flags = []
        self._first_micro_step = run.state.micro_step

    @hookimpl
    def on_micro_step_end(self, loss: torch.Tensor | LossSum) -> None:
        value = loss.total if isinstance(loss, LossSum) else loss
        self._flags.append(~torch.isfinite(value.detach()).all())

    @hookimpl(tryfirst=True)
    def on_before_optimizer_step(self, run: Run, optimizer: torch.optim.Optimizer) -> None:
        device = run.device
        loss_bad = (
            torch.stack([f.to(device) for f in self._flags])
            if self._flags
            else torch.zeros(0, dtype=torch.bool, device=device)
        )
        grad_bad = torch.zeros((), dtype=torch.bool, device=device)
        if self._checks_grads(run):
            norm = _local_grad_norm(optimizer)
            if norm is not None:
                grad_bad = ~torch.isfinite(norm.to(device))
        verdict = torch.stack([loss_bad.any(), grad_bad]).to(torch.float32)
        verdict = run.strategy.all_reduce(verdict, "sum")
        loss_any, grad_any = (bool(v) for v in verdict.tolist())  # the one synchronisation
        if not (loss_any or grad_any):
            return
        step = run.state.step + 1
        local = loss_bad.tolist()
        micro_batch = local.index(True) if True in local else None
        micro_step = None if micro_batch is None else self._first_micro_step + micro_batch + 1
        if micro_batch is not None:
            what = (
                f"non-finite loss at step {step}, micro-batch {micro_batch} (0-based, of "
                f"{len(local)} in the window; micro-step {micro_step} of the run)"
            )
        elif loss_any:
            what = f"non-finite loss on another rank at step {step}"
        else:
            what = f"non-finite gradient norm at step {step}"
        if self.policy == "raise":
            raise NonFiniteError(
                f"numeric-guard: {what}. Lower the learning rate, check the data, or use "
                "policy='skip' to drop such steps.",
                step,
                micro_batch,
                micro_step,
            )
        self.skipped += 1
        self._log_skip = True
        run.skip_step(what)
        if self.policy == "stop":
            run.request_save()
            run.request_stop(f"numeric-guard: {what}")

    @hookimpl
    def on_step_end(self, run: Run) -> None:
        if self._log_skip:  # logged here so that the record carries the dropped step's number
            self._log_skip = False
            run.log({"nonfinite_skipped": self.skipped})

    @hookimpl
    def on_save_checkpoint(self, plugin_state: MutableMapping[str, Any]) -> None:
        plugin_state[self.name] = {"skipped": self.skipped}

    @hookimpl
    def on_load_checkpoint(self, plugin_state: Mapping[str, Any]) -> None:
        state = plugin_state.get(self.name)
        if state is not None:
            self.skipped = int(state.get("skipped", 0))

    def _checks_grads(self, run: Run) -> bool:
        if self.check_grads is not None:
            return self.check_grads
        return not getattr(run.precision, "skips_nonfinite_steps", False)


def _local_grad_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    grads = [
        p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    ]
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    device = norms[0].device
    total: torch.Tensor = torch.linalg.vector_norm(
        torch.stack([n.to(device, torch.float32) for n in norms])
    )
    return total
