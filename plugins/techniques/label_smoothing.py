"""``label-smoothing``: cross-entropy with smoothed targets, as a ``compute_loss`` provider.

The loss is exactly ``F.cross_entropy(logits, labels, label_smoothing=epsilon,
ignore_index=ignore_index)``: each target becomes ``1 - epsilon`` on the true class plus
``epsilon / num_classes`` spread over every class (Szegedy et al. 2016). Positions labelled
``ignore_index`` are not scored.

The plugin calls the model itself and computes the loss from its logits, so the model's own
loss (if it computes one) is not used:

* **the model is called** as the kernel calls it, except that a mapping batch is passed
  *without* its labels (``model(**{k: v for k != labels_key})``), so that a Hugging Face
  model does not compute an unsmoothed loss of its own for nothing (HF's ``LabelSmoother``
  pops the labels the same way); a sequence batch ``(inputs..., labels)`` calls
  ``model(*inputs)``; anything else has no labels and is an error.
* **logits** are the output itself when it is a tensor, else ``outputs.logits`` or
  ``outputs["logits"]``; float16/bfloat16 logits are upcast to float32 for the loss.
* **labels** are ``batch[labels_key]`` for a mapping, the last item of a sequence batch.
* **causal LMs**: with ``causal_lm=True`` position ``t`` is scored against label ``t + 1``
  (labels aligned with the inputs, as HF collators make them). It is an explicit option, not
  guessed from the model's class: HF's ``LabelSmoother`` shifts for ``*ForCausalLM`` models.
* With ``Config(loss_normalization="tokens")`` the plugin returns
  ``treadle.LossSum(sum of the scored positions' losses, their number)``; otherwise the mean
  over scored positions. The count stays on the device: no host synchronisation.

Evaluation uses the same provider, so ``eval/loss`` is the smoothed loss too (as in HF's
Trainer). Because a plugin defines the loss, the kernel's ``eval_step`` keeps no predictions
for ``compute_metrics``; implement ``eval_step`` if you need them.

Options:

* ``epsilon`` (float, default ``0.1``): the smoothing factor, ``0 <= epsilon < 1``.
* ``causal_lm`` (bool, default ``False``): shift the labels by one (next-token prediction).
* ``ignore_index`` (int, default ``-100``): the label value that is not scored.
* ``labels_key`` (str, default ``"labels"``): where a mapping batch keeps its labels.

Equivalents: HF ``TrainingArguments(label_smoothing_factor=0.1)``; Lightning has none built in
(write ``F.cross_entropy(..., label_smoothing=...)`` in ``training_step``).

Example::

    run = treadle.Run(model=lm, train_data=loader,
                      plugins=[{"name": "label-smoothing", "epsilon": 0.1, "causal_lm": True}])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from treadle.errors import ConfigError, TreadleError
from treadle.hookspecs import hookimpl
from treadle.plugins.losses import logits_of
from treadle.state import LossSum

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["LabelSmoothing", "smoothed_cross_entropy"]


def _invalid(option: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"label-smoothing option {option} = {value!r} is not allowed: {allowed}")


def smoothed_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float,
    *,
    ignore_index: int = -100,
    causal_lm: bool = False,
) -> LossSum:
    """Summed label-smoothed cross-entropy of ``logits`` (``[..., C]``) against ``labels``.

    Returns ``LossSum(total, count)``: ``total / count`` equals ``F.cross_entropy(...,
    label_smoothing=epsilon, ignore_index=ignore_index)`` (the mean).
    """
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise TreadleError(
            f"label-smoothing: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
            "do not match (logits must be the labels' shape plus a last, class dimension)"
        )
    if causal_lm:
        if labels.dim() < 1:
            raise TreadleError("label-smoothing: causal_lm=True needs [batch, length] labels")
        # shift the labels left rather than slicing the logits: the same pairs are scored
        # without copying the (large) logits into a contiguous shifted tensor
        labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        flat_labels,
        ignore_index=ignore_index,
        label_smoothing=epsilon,
        reduction="sum",
    )
    return LossSum(total, (flat_labels != ignore_index).sum())


class LabelSmoothing:
    """A ``compute_loss`` provider: label-smoothed cross-entropy of the model's logits.

    Args:
        epsilon: the smoothing factor, ``0 <= epsilon < 1``.
        causal_lm: score position ``t`` against label ``t + 1`` (next-token prediction).
        ignore_index: the label value that is not scored.
        labels_key: the key of the labels in a mapping batch.
    """

    name: ClassVar[str] = "label-smoothing"

    def __init__(
        self,
        epsilon: float = 0.1,
        causal_lm: bool = False,
        ignore_index: int = -100,
        labels_key: str = "labels",
    ) -> None:
        if (
            isinstance(epsilon, bool)
            or not isinstance(epsilon, int | float)
            or not math.isfinite(epsilon)
            or not 0 <= epsilon < 1
        ):
            raise _invalid("epsilon", epsilon, "expected a number with 0 <= epsilon < 1")
        if not isinstance(causal_lm, bool):
            raise _invalid("causal_lm", causal_lm, "expected True or False")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise _invalid("ignore_index", ignore_index, "expected an integer, e.g. -100")
        if not isinstance(labels_key, str) or not labels_key:
            raise _invalid("labels_key", labels_key, "expected a non-empty key, e.g. 'labels'")
        self.epsilon = float(epsilon)
        self.causal_lm = causal_lm
        self.ignore_index = ignore_index
        self.labels_key = labels_key

    def __repr__(self) -> str:
        return (
            f"LabelSmoothing(epsilon={self.epsilon}, causal_lm={self.causal_lm}, "
            f"ignore_index={self.ignore_index}, labels_key={self.labels_key!r})"
        )

    @hookimpl
    def on_init_end(self, run: Run) -> None:
        if run.loss_fn is not None:
            raise ConfigError(
                "label-smoothing computes the loss itself, so the run's loss_fn would be "
                "ignored; pass either loss_fn= or the label-smoothing plugin, not both"
            )

    @hookimpl
    def compute_loss(self, run: Run, model: torch.nn.Module, batch: Any) -> torch.Tensor | LossSum:
        labels, inputs = self._split(batch)
        outputs = _call(model, inputs)
        loss = smoothed_cross_entropy(
            logits_of(outputs),
            labels,
            self.epsilon,
            ignore_index=self.ignore_index,
            causal_lm=self.causal_lm,
        )
        if run.config.loss_normalization == "tokens":
            return loss
        return loss.total / loss.count

    def _split(self, batch: Any) -> tuple[torch.Tensor, Any]:
        """The labels, and what the model is called with: a mapping without the labels, or
        the positional inputs of a sequence batch."""
        if isinstance(batch, Mapping):
            if self.labels_key not in batch:
                raise TreadleError(
                    f"label-smoothing: the batch has no {self.labels_key!r} key (keys: "
                    f"{', '.join(map(str, batch)) or 'none'}); add the labels to the batch or "
                    "set the plugin's labels_key option"
                )
            inputs = {k: v for k, v in batch.items() if k != self.labels_key}
            return batch[self.labels_key], inputs
        if isinstance(batch, list | tuple) and len(batch) >= 2:
            return batch[-1], tuple(batch[:-1])
        raise TreadleError(
            f"label-smoothing: cannot find labels in a {type(batch).__name__} batch; use a "
            f"mapping with a {self.labels_key!r} key or a sequence (inputs..., labels)"
        )


def _call(model: torch.nn.Module, inputs: Mapping[str, Any] | tuple[Any, ...]) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)
