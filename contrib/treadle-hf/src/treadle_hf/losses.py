"""The ``hf-token-loss`` plugin: Hugging Face models' losses as ``treadle.LossSum(total, count)``.

``Config(loss_normalization="tokens")`` divides a window's summed per-token loss by the number
of tokens scored in the whole accumulation window, so every token weighs the same however the
micro-batches are padded. A ``PreTrainedModel`` returns a mean (``outputs.loss``); this
``compute_loss`` provider returns the sum and the count instead, from the model's logits and the
batch's ``labels``:

- causal LMs (GPT-2, Llama, ...): the labels are shifted, position ``t`` scores token ``t + 1``,
  so the count is ``(labels[..., 1:] != -100).sum()``. (transformers' 5.25 Trainer counts
  the unshifted labels for causal LMs without a ``loss_type``, GPT-2 among them, which scales
  their gradients by ``(L - 1) / L``; treadle does not. See docs/migrating-from-hf.md.)
- every other model with token or class logits (seq2seq LMs, masked LMs, token and sequence
  classification): unshifted cross-entropy, count ``(labels != -100).sum()``.

A batch without ``labels`` (or not a mapping) is left to the next ``compute_loss``
implementation, treadle's default. Use it as::

    treadle.Run(..., config=treadle.Config(grad_accum_steps=4, loss_normalization="tokens"),
                plugins=["hf-token-loss"])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

import treadle
from treadle.plugins.losses import IGNORE_INDEX, causal_lm_loss_sum, token_loss_sum

if TYPE_CHECKING:
    from treadle import LossSum, Run

__all__ = ["HFTokenLoss", "is_causal_lm"]


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP/FSDP keep the user's model in .module; PEFT models name their base model
    inner = getattr(model, "module", model)
    get_base = getattr(inner, "get_base_model", None)
    return get_base() if callable(get_base) else inner


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal LM (its labels are shifted inside)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(_unwrap(model)).__name__
    config = getattr(_unwrap(model), "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    return (
        name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        or name.endswith("ForCausalLM")
        or name.endswith("LMHeadModel")
    )


class HFTokenLoss:
    """``compute_loss`` returning ``LossSum(sum of per-token CE, number of scored tokens)``.

    Args:
        causal: force the label shift on (``True``) or off (``False``); default: decided from
            the model's class (``is_causal_lm``).
        ignore_index: the label value that is not scored.
    """

    name: ClassVar[str] = "hf-token-loss"

    def __init__(self, causal: bool | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        self.causal = causal
        self.ignore_index = ignore_index

    def __repr__(self) -> str:
        return f"HFTokenLoss(causal={self.causal}, ignore_index={self.ignore_index})"

    @treadle.hookimpl
    def compute_loss(self, run: Run, model: nn.Module, batch: Any) -> LossSum | None:
        if not isinstance(batch, Mapping) or batch.get("labels") is None:
            return None
        labels = batch["labels"]
        causal = self.causal if self.causal is not None else is_causal_lm(model)
        if causal:
            # without labels the model skips its own (mean) loss: no work done twice
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            logits = model(**inputs).logits
            return causal_lm_loss_sum(logits, labels, self.ignore_index)
        # seq2seq models build their decoder inputs from the labels: pass them through
        logits = model(**batch).logits
        return token_loss_sum(logits, labels, self.ignore_index)
