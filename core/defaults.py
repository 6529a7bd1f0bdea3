"""What the kernel keeps of the default providers, which live in the ``defaults`` plugin.

``PLUGIN_NAME`` is that plugin's entry-point name: ``treadle.Run`` registers it by that name
before any other plugin, and ``alone`` tells whether one of its providers is the only
implementation of a hook. The rest are the few helpers the kernel itself calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from treadle.run import Run

#: the entry-point name (group ``treadle.plugin``) of the plugin holding the default providers
PLUGIN_NAME = "defaults"


def alone(run: Run, hook_name: str) -> bool:
    """Whether the defaults plugin's implementation of ``hook_name`` is the only one."""
    impls = getattr(run.plugin_manager.hook, hook_name).get_hookimpls()
    return len(impls) == 1 and impls[0].plugin_name == PLUGIN_NAME


def batch_rows(batch: Any) -> int:
    """The number of examples in a batch: the first dimension of its first tensor."""
    values: Iterable[Any] = batch
    if type(batch) is dict or isinstance(batch, Mapping):  # dict first: it spares the ABC check
        values = batch.values()
    elif isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    elif not isinstance(batch, Iterable) or isinstance(batch, str | bytes):
        return 1
    for value in values:  # a loop, not next(genexpr): this runs for every micro-batch
        if isinstance(value, torch.Tensor) and (shape := value.shape):  # () for a scalar
            return int(shape[0])
    return 1


def sequence_of(value: Any) -> Sequence[Any]:
    if value is None:
        return ()
    if isinstance(value, str | Mapping) or not isinstance(value, Sequence):
        return (value,)
    return value
