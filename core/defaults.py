"""What the kernel keeps of the default providers, which live in the ``defaults`` plugin.

``PLUGIN_NAME`` is that plugin's entry-point name: ``treadle.Run`` registers it by that name
before any other plugin, and ``alone`` tells whether one of its providers is the only
implementation of a hook. The rest are the few helpers the kernel itself calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from treadle.errors import TreadleError
from treadle.state import LossSum

if TYPE_CHECKING:
    from treadle.run import Run

#: the entry-point name (group ``treadle.plugin``) of the plugin holding the default providers
PLUGIN_NAME = "defaults"


def alone(run: Run, hook_name: str) -> bool:
    """Whether the defaults plugin's implementation of ``hook_name`` is the only one."""
    impls = getattr(run.plugin_manager.hook, hook_name).get_hookimpls()
    return len(impls) == 1 and impls[0].plugin_name == PLUGIN_NAME


def loss_error(
    run: Run, loss: Any, exc: BaseException, *, evaluating: str | None = None
) -> BaseException:
    """A TreadleError saying what is wrong with ``loss``, or ``exc`` itself when the loss is a
    scalar tensor (the failure is elsewhere)."""
    where = f" (evaluating {evaluating!r})" if evaluating else ""
    source = "loss_fn" if run.loss_fn is not None else "compute_loss"
    if isinstance(loss, LossSum):
        loss = loss.total
    if not isinstance(loss, torch.Tensor):
        problem = (
            f"a {type(loss).__name__} ({loss!r}), not a tensor: it was taken out of the graph "
            "(.item(), float(...)), so no gradient can reach the weights. Return the tensor"
        )
    elif loss.numel() != 1:
        problem = (
            f"a tensor of shape {tuple(loss.shape)}, not one number. Reduce it, e.g. "
            "loss.mean(), or use the loss function's reduction='mean'"
        )
    elif evaluating is None and not loss.requires_grad:
        problem = (
            "a tensor with no grad_fn: it is detached from the graph (computed under "
            "torch.no_grad(), with .detach() or from .item()), so no gradient can reach the "
            "weights. Compute it from the model's outputs without detaching"
        )
    else:
        return exc
    return TreadleError(
        f"the loss at step {run.state.step}{where} (from {source}) is {problem}. A loss must be "
        "a scalar tensor computed from the model's outputs."
    )


def batch_rows(batch: Any) -> int:
    """The number of examples in a batch: the first dimension of its first tensor."""
    if type(batch) is dict or isinstance(batch, Mapping):  # dict first: it spares the ABC check
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    elif isinstance(batch, Iterable) and not isinstance(batch, str | bytes):
        values = batch
    else:
        return 1
    for value in values:
        if isinstance(value, torch.Tensor) and (shape := value.shape):  # () for a scalar
            return int(shape[0])
    return 1


def sequence_of(value: Any) -> Sequence[Any]:
    if value is None:
        return ()
    if isinstance(value, str | Mapping) or not isinstance(value, Sequence):
        return (value,)
    return value
