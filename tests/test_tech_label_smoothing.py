"""``label-smoothing``: the loss equals ``F.cross_entropy(label_smoothing=...)``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import treadle
from treadle.errors import ConfigError, TreadleError
from treadle.plugins.techniques.label_smoothing import LabelSmoothing

VOCAB = 11


class Logits(nn.Module):
    """Returns fixed logits (a parameter, so the loss has a gradient) whatever the input."""

    def __init__(self, logits: torch.Tensor, wrap: str = "tensor") -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())
        self.wrap = wrap
        self.seen: list[dict[str, Any]] = []

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        self.seen.append(dict(kwargs))
        if self.wrap == "dict":
            return {"logits": self.logits}
        if self.wrap == "attr":
            return SimpleNamespace(logits=self.logits)
        return self.logits


def fake_run(normalization: str = "mean") -> Any:
    return SimpleNamespace(config=treadle.Config(loss_normalization=normalization), loss_fn=None)


def random_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, VOCAB, generator=generator)
    labels = torch.randint(0, VOCAB, (3, 7), generator=generator)
    labels[0, :2] = -100
    labels[2, 5:] = -100
    return logits, labels


@pytest.mark.parametrize("wrap", ["tensor", "dict", "attr"])
def test_equals_cross_entropy_with_smoothing_and_ignored_positions(wrap: str) -> None:
    logits, labels = random_case()
    model = Logits(logits, wrap)
    loss = LabelSmoothing(epsilon=0.2).compute_loss(
        fake_run(), model, {"input_ids": torch.zeros(3, 7, dtype=torch.long), "labels": labels}
    )
    expected = F.cross_entropy(
        logits.reshape(-1, VOCAB), labels.reshape(-1), label_smoothing=0.2, ignore_index=-100
    )
    assert isinstance(loss, torch.Tensor)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    unsmoothed = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
    assert not torch.allclose(loss, unsmoothed)  # the smoothing is applied
    assert model.seen == [{}]  # the labels were not passed to the model


def test_causal_lm_shift_scores_position_t_against_label_t_plus_1() -> None:
    logits, labels = random_case(1)
    loss = LabelSmoothing(epsilon=0.1, causal_lm=True).compute_loss(
        fake_run(), Logits(logits), {"input_ids": labels.clamp_min(0), "labels": labels}
    )
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB),
        labels[:, 1:].reshape(-1),
        label_smoothing=0.1,
        ignore_index=-100,
    )
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_tokens_mode_returns_the_sum_and_the_scored_count() -> None:
    logits, labels = random_case(2)
    batch = (torch.zeros(3, 7, dtype=torch.long), labels)  # a sequence batch: labels last
    loss = LabelSmoothing(epsilon=0.3, causal_lm=True).compute_loss(
        fake_run("tokens"), Logits(logits), batch
    )
    assert isinstance(loss, treadle.LossSum)
    shifted = labels[:, 1:]
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB),
        shifted.reshape(-1),
        label_smoothing=0.3,
        ignore_index=-100,
        reduction="sum",
    )
    torch.testing.assert_close(loss.total, expected, rtol=1e-6, atol=1e-6)
    assert int(loss.count) == int((shifted != -100).sum())


def test_half_precision_logits_are_upcast() -> None:
    logits, labels = random_case(3)
    loss = LabelSmoothing(epsilon=0.1).compute_loss(
        fake_run(), Logits(logits.bfloat16()), (torch.zeros(1), labels)
    )
    assert loss.dtype == torch.float32


def test_missing_labels_and_logits_are_errors() -> None:
    logits, _ = random_case()
    plugin = LabelSmoothing()
    with pytest.raises(TreadleError, match=r"no 'labels' key.*input_ids"):
        plugin.compute_loss(fake_run(), Logits(logits), {"input_ids": torch.zeros(3)})
    with pytest.raises(TreadleError, match="cannot find labels in a Tensor batch"):
        plugin.compute_loss(fake_run(), Logits(logits), torch.zeros(3))

    class NoLogits(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": x.sum()}

    with pytest.raises(TreadleError, match="no logits"):
        plugin.compute_loss(fake_run(), NoLogits(), (torch.zeros(3), torch.zeros(3)))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"epsilon": 1.0}, "epsilon = 1.0"),
        ({"epsilon": -0.1}, "epsilon = -0.1"),
        ({"epsilon": float("nan")}, "epsilon = nan"),
        ({"epsilon": True}, "epsilon = True"),
        ({"causal_lm": "yes"}, "causal_lm = 'yes'"),
        ({"ignore_index": 1.5}, "ignore_index = 1.5"),
        ({"labels_key": ""}, "labels_key = ''"),
    ],
)
def test_bad_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LabelSmoothing(**options)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(self.embed(input_ids))}


def lm_data() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, VOCAB, (2, 6), generator=generator)
        labels = ids.clone()
        labels[1, 4:] = -100  # padding
        batches.append({"input_ids": ids, "labels": labels})
    return batches


@pytest.mark.timeout(60)
@pytest.mark.parametrize("normalization", ["mean", "tokens"])
def test_a_run_trains_on_the_smoothed_loss(normalization: str) -> None:
    """Found by name; the first logged loss is the smoothed causal-LM loss of the first batch."""
    torch.manual_seed(0)
    model = TinyLM()
    data = lm_data()
    first = data[0]
    with torch.no_grad():
        logits = model(first["input_ids"])["logits"]
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB),
        first["labels"][:, 1:].reshape(-1),
        label_smoothing=0.25,
    )
    losses: list[float] = []

    class Record:
        @treadle.hookimpl
        def on_step_end(self, loss: torch.Tensor) -> None:
            losses.append(float(loss))

    run = treadle.Run(
        model,
        data,
        config=treadle.Config(max_steps=2, loss_normalization=normalization),
        optimizer={"name": "sgd", "lr": 0.1},
        loggers=[],
        checkpoint=None,
        plugins=[{"name": "label-smoothing", "epsilon": 0.25, "causal_lm": True}, Record()],
    )
    run.fit()
    assert losses[0] == pytest.approx(float(expected), rel=1e-5)
    assert losses[1] != losses[0]  # it trained


def test_loss_fn_and_the_plugin_together_is_an_error() -> None:
    with pytest.raises(ConfigError, match="loss_fn"):
        treadle.Run(
            TinyLM(),
            lm_data(),
            loss_fn=lambda outputs, batch: outputs["logits"].sum(),
            loggers=[],
            plugins=["label-smoothing"],
        )
