"""Token losses as ``treadle.LossSum``: what ``Config(loss_normalization="tokens")`` needs.

With ``"tokens"`` the kernel back-propagates each micro-batch's *sum* of per-token losses and,
after the accumulation window, divides the gradients by the number of tokens the loss scored in
the whole window. A loss function therefore reports both numbers: ``LossSum(total, count)``.

Two functions do the arithmetic, and two small classes adapt them to ``Run(loss_fn=...)``
(``loss_fn(outputs, batch)``)::

    from treadle.plugins.losses import CausalLMLoss

    run = treadle.Run(model=lm, train_data=loader, loss_fn=CausalLMLoss(),
                      config=treadle.Config(grad_accum_steps=4, loss_normalization="tokens"))

``count`` is the number of positions whose label is not ``ignore_index`` *after* the
causal-LM shift: position ``t`` predicts token ``t + 1``, so a sequence of ``L`` labelled
tokens scores ``L - 1`` of them. (transformers' Trainer, as measured in 5.25, counts the
unshifted labels for causal LMs without a ``loss_type``, GPT-2 among them, which scales their
gradients by ``(L - 1) / L``; for ``*ForCausalLM`` classes it counts as treadle does.)

Half-precision logits (float16, bfloat16) are upcast to float32 for the loss; float32 and
float64 logits are used as they are. Counts stay on the device: no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from treadle.errors import TreadleError
from treadle.state import LossSum

__all__ = ["CausalLMLoss", "TokenLoss", "causal_lm_loss_sum", "logits_of", "token_loss_sum"]

#: The label value that the losses skip (the convention of ``F.cross_entropy`` and Hugging Face).
IGNORE_INDEX: int = -100


def token_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> LossSum:
    """Summed cross-entropy of ``logits`` (``[..., V]``) against ``labels`` (``[...]``), no shift.

    Args:
        logits: unnormalised scores, the class dimension last.
        labels: class indices, the shape of ``logits`` without its last dimension;
            ``ignore_index`` marks positions that are not scored (padding).
        ignore_index: the label value to skip.

    Returns:
        ``LossSum(total, count)``: the sum of the scored positions' losses and their number
        (an integer tensor on the logits' device).
    """
    if logits.shape[:-1] != labels.shape:
        raise TreadleError(
            f"token_loss_sum: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do "
            "not match (logits must be labels' shape plus a last, class dimension)"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        flat_labels,
        ignore_index=ignore_index,
        reduction="sum",
    )
    count = (flat_labels != ignore_index).sum()
    return LossSum(total, count)


def causal_lm_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> LossSum:
    """Next-token loss: ``logits[..., t, :]`` is scored against ``labels[..., t + 1]``.

    Args:
        logits: ``[batch, length, vocab]`` scores for every position.
        labels: ``[batch, length]`` token ids, aligned with the inputs (not pre-shifted), with
            ``ignore_index`` on padding and on any prompt positions not to be trained on.
        ignore_index: the label value to skip.

    Returns:
        ``LossSum(total, count)`` where ``count`` counts the shifted labels that are scored:
        ``L - 1`` per unpadded sequence of length ``L``.
    """
    if logits.dim() < 2 or logits.shape[:-1] != labels.shape:
        raise TreadleError(
            f"causal_lm_loss_sum: logits {tuple(logits.shape)} and labels "
            f"{tuple(labels.shape)} do not match (expected [batch, length, vocab] and "
            "[batch, length])"
        )
    # Shift the labels left instead of slicing the logits: the same pairs are scored, and
    # the (large) logits tensor is not copied into a contiguous shifted view.
    shifted = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    return token_loss_sum(logits, shifted, ignore_index)


class TokenLoss:
    """``loss_fn(outputs, batch)`` giving :func:`token_loss_sum` (no shift).

    Logits are ``outputs`` itself when it is a tensor, else ``outputs.logits`` or
    ``outputs["logits"]``. Labels are ``batch[labels_key]`` for a mapping batch, else
    ``batch[1]`` for an ``(inputs, labels)`` sequence.

    Args:
        ignore_index: the label value to skip.
        labels_key: where a mapping batch keeps its labels.
    """

    shift: ClassVar[bool] = False

    def __init__(self, ignore_index: int = IGNORE_INDEX, labels_key: str = "labels") -> None:
        self.ignore_index = ignore_index
        self.labels_key = labels_key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ignore_index={self.ignore_index}, labels_key={self.labels_key!r})"

    def __call__(self, outputs: Any, batch: Any) -> LossSum:
        logits, labels = logits_of(outputs), self._labels(batch)
        compute = causal_lm_loss_sum if self.shift else token_loss_sum
        return compute(logits, labels, self.ignore_index)

    def _labels(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, Mapping):
            if self.labels_key in batch:
                return batch[self.labels_key]  # type: ignore[no-any-return]
            raise TreadleError(
                f"{type(self).__name__}: the batch has no {self.labels_key!r} key (keys: "
                f"{', '.join(map(str, batch))}); pass labels_key=... or add the labels"
            )
        if isinstance(batch, list | tuple) and len(batch) >= 2:
            return batch[1]  # type: ignore[no-any-return]
        raise TreadleError(
            f"{type(self).__name__}: cannot find labels in a {type(batch).__name__} batch; use "
            "a mapping with a 'labels' key or an (inputs, labels) pair"
        )


class CausalLMLoss(TokenLoss):
    """``loss_fn(outputs, batch)`` giving :func:`causal_lm_loss_sum` (labels shifted by one).

    The labels are aligned with the inputs (``labels = input_ids`` with padding set to
    ``ignore_index``), as Hugging Face collators produce them.
    """

    shift = True


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits a model returned: the tensor itself, ``.logits`` or ``["logits"]``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise TreadleError(
            f"the model returned {type(outputs).__name__} with no logits: return a tensor, an "
            "object with .logits or a mapping with a 'logits' key"
        )
    return logits
