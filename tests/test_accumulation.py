"""Gradient accumulation: ``mean`` and ``tokens`` normalisation, short last windows, no_sync.

Every comparison trains the same float64 model twice and compares the weights to 1e-10: once
with the whole window as one batch and no accumulation, once split into micro-batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import treadle
from treadle.plugins.losses import CausalLMLoss, causal_lm_loss_sum, token_loss_sum
from treadle.plugins.precision import FP64
from treadle.plugins.strategies.single import SingleDevice

TOL = 1e-10
VOCAB = 11
PAD = 0


# ---------------------------------------------------------------- models and data


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyCausalLM(nn.Module):
    """Embedding, a causal running mean over positions, a projection to the vocabulary.

    Position t sees only positions <= t, so right padding never changes a scored position.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)
        h = torch.tanh(self.mix(h.cumsum(dim=1) / steps[:, None]))
        return self.head(h)


def regression_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(4, 1, generator=gen, dtype=torch.float64) + 0.1
    return x, y


def regression_batches(x: torch.Tensor, y: torch.Tensor, sizes: Sequence[int]) -> list[Any]:
    out, start = [], 0
    for size in sizes:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    assert start == len(x)
    return out


def sequences(n: int) -> list[torch.Tensor]:
    """Token sequences of very different lengths (2 to 14), so token weighting matters."""
    gen = torch.Generator().manual_seed(2)
    lengths = [2 + int(v) for v in torch.randint(0, 13, (n,), generator=gen)]
    return [torch.randint(1, VOCAB, (length,), generator=gen) for length in lengths]


def lm_batches(seqs: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Batches padded to their own longest sequence, as a collator would pad them."""
    out, start = [], 0
    for size in sizes:
        group = seqs[start : start + size]
        width = max(len(s) for s in group)
        ids = torch.full((size, width), PAD, dtype=torch.long)
        labels = torch.full((size, width), -100, dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, : len(seq)] = seq
            labels[row, : len(seq)] = seq
        out.append({"input_ids": ids, "labels": labels})
        start += size
    assert start == len(seqs)
    return out


def mse(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
    return F.mse_loss(outputs, batch[1])


def train(
    model_cls: type[nn.Module],
    batches: list[Any],
    *,
    accum: int,
    normalization: str,
    loss_fn: Any,
    strategy: Any = None,
    plugins: Sequence[Any] = (),
    optimizer: str = "adamw",
) -> tuple[dict[str, torch.Tensor], treadle.Run]:
    torch.manual_seed(0)
    model = model_cls()
    if optimizer == "adamw":
        factory: Any = lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.01)  # noqa: E731
    else:
        factory = lambda m: torch.optim.SGD(m.parameters(), lr=1.0)  # noqa: E731
    run = treadle.Run(
        model=model,
        train_data=batches,
        strategy=strategy or SingleDevice("cpu"),
        precision=FP64(),
        optimizer=factory,
        loggers=[],
        checkpoint=None,
        plugins=list(plugins),
        loss_fn=loss_fn,
        config=treadle.Config(
            max_epochs=1, grad_accum_steps=accum, loss_normalization=normalization, log_every=0
        ),
    )
    run.fit()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, run


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---------------------------------------------------------------- mean


def test_mean_batch_8_equals_batch_2_times_4() -> None:
    x, y = regression_data(32)
    whole, run = train(
        Regressor, regression_batches(x, y, [8] * 4), accum=1, normalization="mean", loss_fn=mse
    )
    split, run_split = train(
        Regressor, regression_batches(x, y, [2] * 16), accum=4, normalization="mean", loss_fn=mse
    )
    assert run.state.step == run_split.state.step == 4
    assert max_difference(whole, split) < TOL
    # and the comparison is sharp: training moved the weights far more than the tolerance
    torch.manual_seed(0)
    initial = Regressor().double().state_dict()
    assert max_difference(whole, initial) > 1e-2


def test_mean_uneven_last_window_is_divided_by_its_real_length() -> None:
    # 10 samples, micro-batches of 2, windows of 4: the second window has one micro-batch
    x, y = regression_data(10)
    split, run = train(
        Regressor, regression_batches(x, y, [2] * 5), accum=4, normalization="mean", loss_fn=mse
    )
    whole, _ = train(
        Regressor, regression_batches(x, y, [8, 2]), accum=1, normalization="mean", loss_fn=mse
    )
    assert run.state.step == 2 and run.state.micro_step == 5
    assert max_difference(whole, split) < TOL


# ---------------------------------------------------------------- tokens


def test_tokens_batch_8_equals_batch_2_times_4_on_padded_variable_lengths() -> None:
    seqs = sequences(32)
    whole, run = train(
        TinyCausalLM,
        lm_batches(seqs, [8] * 4),
        accum=1,
        normalization="tokens",
        loss_fn=CausalLMLoss(),
    )
    split, run_split = train(
        TinyCausalLM,
        lm_batches(seqs, [2] * 16),
        accum=4,
        normalization="tokens",
        loss_fn=CausalLMLoss(),
    )
    assert run.state.step == run_split.state.step == 4
    assert max_difference(whole, split) < TOL
    # tokens_seen counts the scored (shifted) tokens
    assert run_split.state.tokens_seen == sum(len(s) - 1 for s in seqs)


def test_mean_and_tokens_differ_on_variable_lengths() -> None:
    """The check above can fail: averaging micro-batch means weights tokens unequally."""
    seqs = sequences(32)
    tokens, _ = train(
        TinyCausalLM,
        lm_batches(seqs, [2] * 16),
        accum=4,
        normalization="tokens",
        loss_fn=CausalLMLoss(),
    )
    mean, _ = train(
        TinyCausalLM,
        lm_batches(seqs, [2] * 16),
        accum=4,
        normalization="mean",
        loss_fn=CausalLMLoss(),
    )
    assert max_difference(tokens, mean) > 1e-4


def test_tokens_uneven_last_window_is_divided_by_its_own_token_count() -> None:
    seqs = sequences(10)
    split, run = train(
        TinyCausalLM,
        lm_batches(seqs, [2] * 5),
        accum=4,
        normalization="tokens",
        loss_fn=CausalLMLoss(),
    )
    whole, _ = train(
        TinyCausalLM,
        lm_batches(seqs, [8, 2]),
        accum=1,
        normalization="tokens",
        loss_fn=CausalLMLoss(),
    )
    assert run.state.step == 2
    assert max_difference(whole, split) < TOL


def test_tokens_needs_a_loss_sum() -> None:
    x, y = regression_data(8)
    with pytest.raises(treadle.TreadleError, match="LossSum"):
        train(
            Regressor,
            regression_batches(x, y, [4, 4]),
            accum=2,
            normalization="tokens",
            loss_fn=mse,
        )


# ---------------------------------------------------------------- the causal-LM divisor


def test_causal_lm_loss_sum_counts_shifted_tokens() -> None:
    seqs = sequences(6)
    batch = lm_batches(seqs, [6])[0]
    torch.manual_seed(0)
    logits = torch.randn(*batch["labels"].shape, VOCAB, dtype=torch.float64)
    total, count = causal_lm_loss_sum(logits, batch["labels"])
    assert int(count) == sum(len(s) - 1 for s in seqs)
    assert int(count) != sum(len(s) for s in seqs)
    expected = sum(
        F.cross_entropy(logits[row, : len(s) - 1], s[1:], reduction="sum")
        for row, s in enumerate(seqs)
    )
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)
    # without the shift, every labelled position is scored
    _, unshifted = token_loss_sum(logits, batch["labels"])
    assert int(unshifted) == sum(len(s) for s in seqs)


def test_causal_lm_step_divides_by_the_shifted_token_count() -> None:
    """One SGD step (lr 1) over a window of 3 micro-batches equals minus the gradient of the
    true token mean, and differs from the (L-1)/L-scaled gradient transformers' Trainer takes.
    """
    seqs = sequences(6)
    batches = lm_batches(seqs, [2, 2, 2])
    after, _ = train(
        TinyCausalLM,
        batches,
        accum=3,
        normalization="tokens",
        loss_fn=CausalLMLoss(),
        optimizer="sgd",
    )
    torch.manual_seed(0)
    model = TinyCausalLM().double()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses = []
    for row, seq in enumerate(seqs):
        logits = model(seq[None])[0]
        losses.append(F.cross_entropy(logits[:-1], seq[1:], reduction="sum"))
        del row
    shifted = sum(len(s) - 1 for s in seqs)
    unshifted = sum(len(s) for s in seqs)
    (torch.stack(losses).sum() / shifted).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    expected = {k: before[k] - grads[k] for k in before}
    assert max_difference(after, expected) < TOL
    hf_style = {k: before[k] - grads[k] * shifted / unshifted for k in before}
    assert max_difference(after, hf_style) > 1e-4


# ---------------------------------------------------------------- synchronisation


class RecordingStrategy(SingleDevice):
    """Records, for each backward, whether it ran inside ``no_sync``."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.inside = False
        self.record: list[bool] = []

    @contextlib.contextmanager
    def _no_sync(self) -> Iterator[None]:
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return self._no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        self.record.append(self.inside)
        super().backward(loss)


def test_gradient_sync_is_skipped_on_non_final_micro_batches() -> None:
    x, y = regression_data(20)
    strategy = RecordingStrategy()
    train(
        Regressor,
        regression_batches(x, y, [2] * 10),
        accum=4,
        normalization="mean",
        loss_fn=mse,
        strategy=strategy,
    )
    # windows of 4, 4 and 2 micro-batches: only each window's last one synchronises
    no, yes = True, False
    assert strategy.record == [no, no, no, yes, no, no, no, yes, no, yes]
