"""Bad training data, batches and losses: each ends in a treadle error naming the step, what was
received and what was expected; none hangs. Tuple batches follow ``(inputs..., target)``; a
non-finite logged loss warns once without ``numeric-guard``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import toy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import treadle
from treadle.errors import ConfigError, TreadleError, TreadleWarning


def make(tmp_path: Path, train_data: Any, model: nn.Module | None = None, **options: Any) -> Any:
    config = {"max_steps": 5, "output_dir": str(tmp_path), "save_at_end": False}
    config.update(options.pop("config", {}))
    torch.manual_seed(0)
    return treadle.Run(
        model if model is not None else toy.model(),
        train_data,
        config=treadle.Config(**config),
        loggers=[],
        checkpoint=None,
        **options,
    )


# ------------------------------------------------------------------ data that yields nothing


def one_shot() -> Iterator[dict[str, torch.Tensor]]:
    yield from toy.train_data(n=16)  # two batches, then exhausted for good


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("data", "config", "expected"),
    [
        ([], {}, r"no batch in epoch 0 \(at step 0\): it is a list of length 0\. It is empty"),
        (toy.dataset(0), {"batch_size": 4}, r"no batch in epoch 0 .* Pairs of length 0"),
        (
            DataLoader(toy.dataset(3), batch_size=8, drop_last=True),
            {},
            r"drop_last=True drops the only batch, which is incomplete \(3 rows, batch_size=8\)",
        ),
        (
            toy.dataset(3),
            {"batch_size": 8, "drop_last": True},
            r"a Pairs of length 3 \(loaded as a DataLoader of 0 batches",
        ),
        (
            one_shot(),
            {"max_steps": 10},
            r"no batch in epoch 1 \(at step 2\).*iterated once only.*max_steps <= 2",
        ),
    ],
    ids=["empty-list", "empty-dataset", "drop-last-loader", "drop-last-dataset", "generator"],
)
def test_training_data_without_a_batch_raises_instead_of_hanging(
    tmp_path: Path, data: Any, config: dict[str, Any], expected: str
) -> None:
    with pytest.raises(TreadleError, match=expected):
        make(tmp_path, data, config=config).fit()


def test_training_data_that_is_not_iterable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train_data is a int .*not an iterable of batches"):
        make(tmp_path, 42).fit()
    with pytest.raises(ConfigError, match=r"a str .*not an iterable of batches"):
        make(tmp_path, "data.csv").fit()
    one_batch = toy.train_data()[0]
    with pytest.raises(ConfigError, match=r"one batch, not a collection of them"):
        make(tmp_path, one_batch).fit()


def test_accumulation_longer_than_an_epoch(tmp_path: Path) -> None:
    run = make(tmp_path, toy.train_data(n=24), config={"grad_accum_steps": 4})
    with pytest.raises(ConfigError, match=r"grad_accum_steps = 4 is larger than the 3 batches"):
        run.fit()


# ------------------------------------------------------------------ batches and losses


def test_batch_keys_that_do_not_fit_forward(tmp_path: Path) -> None:
    x, y = toy.samples(8)
    with pytest.raises(TreadleError) as caught:
        make(tmp_path, [{"inputs": x, "y": y}]).fit()
    message = str(caught.value)
    assert "batch at step 0 does not fit the model" in message
    assert "Regression.forward(x: " in message and "'inputs': tensor (8, 4) float32" in message
    assert "unexpected key 'inputs'; missing argument 'x'" in message


def test_a_type_error_inside_forward_is_left_alone(tmp_path: Path) -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
            return len(5)  # type: ignore[arg-type]  # a bug inside the model, not the batch

    with pytest.raises(TypeError, match=r"object of type 'int' has no len"):
        make(tmp_path, toy.train_data(), model=Broken()).fit()


class Scalar(nn.Module):
    def __init__(self, loss: Any) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.loss = loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        out = self.linear(x).squeeze(-1)
        return {"loss": self.loss(out, y)}


@pytest.mark.parametrize("plain", [True, False], ids=["no-step-listener", "step-listener"])
@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        (lambda out, y: (out - y) ** 2, r"a tensor of shape \(8,\), not one number"),
        (lambda out, y: ((out - y) ** 2).mean().item(), r"a float \(.*\), not a tensor"),
        (lambda out, y: ((out - y) ** 2).mean().detach(), r"a tensor with no grad_fn"),
    ],
    ids=["vector", "float", "detached"],
)
def test_losses_that_cannot_train(tmp_path: Path, loss: Any, expected: str, plain: bool) -> None:
    class Listen:  # an event inside the step: the built step calls it
        @treadle.hookimpl
        def on_step_begin(self) -> None:
            pass

    plugins = [] if plain else [Listen()]
    run = make(tmp_path, toy.train_data(), model=Scalar(loss), plugins=plugins)
    with pytest.raises(
        TreadleError, match=rf"the loss at step 0 \(from compute_loss\) is {expected}"
    ):
        run.fit()


def test_empty_eval_set_is_refused(tmp_path: Path) -> None:
    run = make(tmp_path, toy.train_data(), eval_data={"val": []})
    with pytest.raises(TreadleError, match=r"eval set 'val' yielded no batch .*a list of length 0"):
        run.evaluate()


def test_vector_eval_loss(tmp_path: Path) -> None:
    run = make(tmp_path, toy.train_data(), model=Scalar(lambda out, y: (out - y) ** 2))
    with pytest.raises(TreadleError, match=r"evaluating 'eval'.*shape \(8,\), not one number"):
        run.evaluate(toy.train_data())


# ------------------------------------------------------------------ tuple batches


def tensor_dataset_loader(n: int = 32, classes: int = 3) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    return DataLoader(TensorDataset(x, x[:, :classes].argmax(-1)), batch_size=8)


def test_tuple_batches_call_the_model_with_the_inputs_and_loss_fn_with_the_batch(
    tmp_path: Path,
) -> None:
    seen: list[Any] = []

    def loss_fn(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        seen.append((tuple(outputs.shape), type(batch).__name__))
        return nn.functional.cross_entropy(outputs, batch[-1])

    run = make(tmp_path, tensor_dataset_loader(), model=nn.Linear(4, 3), loss_fn=loss_fn)
    run.fit()
    assert run.state.step == 5 and seen[0] == ((8, 3), "list")
    metrics = run.evaluate(tensor_dataset_loader())
    assert set(metrics) == {"eval/loss"}


def test_three_item_batches_pass_every_input(tmp_path: Path) -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 1)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.linear(a + b).squeeze(-1)

    x, y = toy.samples(16)
    batches = [(x[:8], x[8:], y[:8])]
    run = make(
        tmp_path,
        batches,
        model=TwoInputs(),
        loss_fn=lambda out, batch: nn.functional.mse_loss(out, batch[-1]),
        config={"max_steps": 2},
    )
    assert run.fit().step == 2
    assert treadle.plugins.defaults.labels_of(batches[0]) is batches[0][2]


def test_tuple_batch_without_a_loss_shows_both_fixes(tmp_path: Path) -> None:
    run = make(tmp_path, tensor_dataset_loader(), model=nn.Linear(4, 3))
    with pytest.raises(TreadleError) as caught:
        run.fit()
    message = str(caught.value)
    assert "at step 0 the model returned a tensor of shape (8, 3)" in message
    assert "a list of 2 (tensor (8, 4) float32, tensor (8,) int64)" in message
    assert (
        "loss_fn=lambda outputs, batch: torch.nn.functional.cross_entropy(outputs, batch[-1])"
        in message
    )
    assert "return the loss from forward" in message


def test_a_loss_fn_of_outputs_and_target_is_told_how_to_take_the_batch(tmp_path: Path) -> None:
    run = make(
        tmp_path,
        tensor_dataset_loader(),
        model=nn.Linear(4, 3),
        loss_fn=nn.functional.cross_entropy,
    )
    with pytest.raises(
        TreadleError, match=r"loss_fn cross_entropy raised TypeError at step 0"
    ) as caught:
        run.fit()
    assert "loss_fn=lambda outputs, batch: cross_entropy(outputs, batch[-1])" in str(caught.value)


# ------------------------------------------------------------------ non-finite losses


class NaNFrom:
    """``loss_fn``: NaN from step ``at`` on (a diverged run)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, outputs: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        self.calls += 1
        loss = outputs["loss"]
        return loss * float("nan") if self.calls > self.at else loss


def test_a_non_finite_logged_loss_warns_once(tmp_path: Path) -> None:
    run = make(tmp_path, toy.train_data(), loss_fn=NaNFrom(2), config={"log_every": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit()
    nan_warnings = [w for w in caught if issubclass(w.category, TreadleWarning)]
    assert len(nan_warnings) == 1, [str(w.message) for w in caught]
    message = str(nan_warnings[0].message)
    assert "logged at step 3 is nan" in message and "plugins=['numeric-guard']" in message


def test_no_warning_when_numeric_guard_watches(tmp_path: Path) -> None:
    run = make(
        tmp_path,
        toy.train_data(),
        loss_fn=NaNFrom(2),
        config={"log_every": 1},
        plugins=[{"name": "numeric-guard", "policy": "skip"}],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit()
    assert not [
        w for w in caught if "numeric-guard" in str(w.message) and "logged" in str(w.message)
    ]
