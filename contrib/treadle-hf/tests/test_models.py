"""Hugging Face models and data train through treadle exactly as a hand-written loop does.

Every run here: the same tiny model (same seed), the same batches in the same order, SGD,
``grad_accum_steps=2``; treadle's final weights and per-step losses are compared with
``torch.equal`` against a plain PyTorch loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS, lm_batches, tiny_bert_classifier, tiny_gpt2, tiny_t5, tiny_tokenizer
from torch import nn
from treadle_hf.data import HFData, loader
from treadle_hf.losses import HFTokenLoss

import treadle

LR, STEPS, ACCUM = 0.1, 3, 2


class StepLosses:
    """Records the loss of every optimizer step, as treadle hands it to ``on_step_end``."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    @treadle.hookimpl
    def on_step_end(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach().clone())


def treadle_fit(
    model: nn.Module, data: Any, *, plugins: list[Any] = (), **config: Any
) -> list[torch.Tensor]:
    recorder = StepLosses()
    run = treadle.Run(
        model=model,
        train_data=data,
        config=treadle.Config(max_steps=STEPS, grad_accum_steps=ACCUM, **config),
        optimizer={"name": "sgd", "lr": LR},
        loggers=[],
        checkpoint=None,
        plugins=[*plugins, recorder],
    )
    run.fit()
    return recorder.losses


def hand_loop(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    loss_of: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, Any]],
) -> list[torch.Tensor]:
    """Accumulate ``ACCUM`` micro-batches, divide the gradients by the window's count (micro
    batches, or scored tokens), step SGD: the textbook loop."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        window = batches[step * ACCUM : (step + 1) * ACCUM]
        total, count = None, 0
        for batch in window:
            loss, items = loss_of(model, batch)
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
            count = count + items
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(count)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / count)
    return losses


def mean_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    return model(**batch).loss, 1


def assert_same(a: nn.Module, b: nn.Module, la: list[torch.Tensor], lb: list[torch.Tensor]):
    assert len(la) == len(lb) == STEPS
    for x, y in zip(la, lb, strict=True):
        assert torch.equal(x, y), (x, y)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# ----------------------------------------------------------------------------- batches


def gpt2_batches() -> list[dict[str, torch.Tensor]]:
    return lm_batches(STEPS * ACCUM, 12, batch_size=3)


def bert_batches() -> list[dict[str, torch.Tensor]]:
    batches = lm_batches(STEPS * ACCUM, 10, batch_size=4, seed=7)
    labels = torch.Generator().manual_seed(8)
    return [
        {
            "input_ids": b["input_ids"],
            "attention_mask": b["attention_mask"],
            "labels": torch.randint(0, 2, (4,), generator=labels),
        }
        for b in batches
    ]


def t5_batches() -> list[dict[str, torch.Tensor]]:
    sources = lm_batches(STEPS * ACCUM, 10, batch_size=3, seed=11)
    targets = lm_batches(STEPS * ACCUM, 6, batch_size=3, seed=12)
    return [
        {"input_ids": s["input_ids"], "attention_mask": s["attention_mask"], "labels": t["labels"]}
        for s, t in zip(sources, targets, strict=True)
    ]


# ----------------------------------------------------------------------------- models


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("build", "batches"),
    [(tiny_gpt2, gpt2_batches), (tiny_bert_classifier, bert_batches), (tiny_t5, t5_batches)],
    ids=["gpt2-causal-lm", "bert-sequence-classification", "t5-seq2seq"],
)
def test_pretrained_model_trains_through_its_outputs_loss(build: Any, batches: Any) -> None:
    """treadle's default compute_loss: dict batch → model(**batch) → outputs.loss."""
    data = batches()
    ours, reference = build(), build()
    assert_same(ours, reference, treadle_fit(ours, data), hand_loop(reference, data, mean_loss))


def padded_gpt2_batches() -> list[dict[str, torch.Tensor]]:
    """Rows with different numbers of scored tokens (padding labelled -100), so a per-token
    mean over the window differs from a mean of micro-batch means."""
    batches = lm_batches(STEPS * ACCUM, 12, batch_size=3, seed=21)
    for index, batch in enumerate(batches):
        cut = 4 + index  # the last `cut` positions of row 0 are padding
        batch["attention_mask"][0, -cut:] = 0
        batch["labels"][0, -cut:] = -100
    return batches


def shifted_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    """Sum of next-token losses and the number of scored (shifted) labels."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    # labels shifted left, last position unscored: the same pairs as logits[:, :-1] vs labels[:, 1:]
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), reduction="sum"
    )
    return total, (batch["labels"][:, 1:] != -100).sum()


@pytest.mark.timeout(120)
def test_token_weighted_accumulation_counts_the_shifted_labels() -> None:
    data = padded_gpt2_batches()
    ours, reference = tiny_gpt2(), tiny_gpt2()
    losses = treadle_fit(ours, data, plugins=[HFTokenLoss()], loss_normalization="tokens")
    assert_same(ours, reference, losses, hand_loop(reference, data, shifted_token_loss))


def test_token_loss_is_the_models_own_mean() -> None:
    """The LossSum's total / count is the loss the model itself reports."""
    model, batch = tiny_gpt2(), padded_gpt2_batches()[0]
    total, count = HFTokenLoss().compute_loss(run=None, model=model, batch=batch)
    assert count == (batch["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(total / count, model(**batch).loss, rtol=1e-6, atol=0)


def test_token_loss_leaves_batches_without_labels_to_treadle() -> None:
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long)}
    assert HFTokenLoss().compute_loss(run=None, model=tiny_gpt2(), batch=batch) is None


# ----------------------------------------------------------------------------- datasets


def text_dataset() -> Any:
    datasets = pytest.importorskip("datasets")
    generator = torch.Generator().manual_seed(3)
    texts, labels = [], []
    for _ in range(STEPS * ACCUM * 2):
        length = int(torch.randint(2, 9, (1,), generator=generator))
        picks = torch.randint(0, len(WORDS), (length,), generator=generator).tolist()
        texts.append(" ".join(WORDS[i] for i in picks))
        labels.append(int(torch.randint(0, 2, (1,), generator=generator)))
    tokenizer = tiny_tokenizer()
    dataset = datasets.Dataset.from_dict({"text": texts, "label": labels})
    return dataset.map(lambda row: tokenizer(row["text"]), batched=True), tokenizer


@pytest.mark.timeout(120)
@pytest.mark.parametrize("way", ["hf-data plugin", "loader()"])
def test_dataset_with_padding_collator_drops_the_text_column(
    way: str, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import DataCollatorWithPadding

    dataset, tokenizer = text_dataset()
    collator = DataCollatorWithPadding(tokenizer)
    ours, reference = (
        tiny_bert_classifier(vocab=len(WORDS) + 2),
        tiny_bert_classifier(vocab=len(WORDS) + 2),
    )
    with caplog.at_level(logging.INFO, logger="treadle_hf.data"):
        if way == "hf-data plugin":
            losses = treadle_fit(
                ours, dataset, plugins=[HFData(collator)], batch_size=2, shuffle=False
            )
        else:
            data = loader(dataset, ours, collator=collator, batch_size=2)
            losses = treadle_fit(ours, data)
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 1 and "text" in dropped[0], dropped

    # the hand loop: the same rows, in order, padded by the same collator
    rows = dataset.remove_columns(["text"])
    batches = [dict(collator([rows[i], rows[i + 1]])) for i in range(0, len(rows), 2)]
    assert set(batches[0]) >= {"input_ids", "attention_mask", "labels"}  # 'label' renamed
    assert_same(ours, reference, losses, hand_loop(reference, batches, mean_loss))


def test_a_dataset_whose_columns_fit_nothing_is_refused() -> None:
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"text": ["a", "b"]})
    with pytest.raises(treadle.ConfigError, match="no column"):
        loader(dataset, tiny_gpt2())
