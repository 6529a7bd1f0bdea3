"""``auto-batch-size``: an injected out-of-memory error at the start splits micro-batches, and
the run equals one with the small batch and more accumulation."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import toy
from torch import nn

import treadle
from treadle.errors import ConfigError, PluginError, TreadleError, TreadleWarning
from treadle.plugins.strategies.single import SingleDevice
from treadle.plugins.techniques.auto_batch_size import AutoBatchSize, split_batch


def out_of_memory(rows: int) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory (injected: {rows} rows)")


class FailsInBackward(torch.autograd.Function):
    """Identity whose backward runs out of memory above ``limit`` rows: by then the layers
    after it have their gradients, which a retry must drop."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, limit: int) -> torch.Tensor:
        ctx.limit = limit
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if grad.shape[0] > ctx.limit:
            raise out_of_memory(grad.shape[0])
        return grad, None


class Limited(nn.Module):
    """toy.Regression with dropout and batch norm that "runs out of memory" above ``limit``
    rows: in forward (after dropout and batch norm ran) or in backward; ``after_calls``
    forwards fit before the limit applies."""

    def __init__(
        self, limit: int | None, where: str = "forward", after_calls: int = 0, norm: bool = True
    ) -> None:
        super().__init__()
        norm_layer = nn.BatchNorm1d(16) if norm else nn.Identity()
        self.first = nn.Sequential(nn.Linear(4, 16), norm_layer, nn.Dropout(0.2))
        self.last = nn.Sequential(nn.Tanh(), nn.Linear(16, 1))
        self.limit, self.where, self.after_calls, self.calls = limit, where, after_calls, 0

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        limited = self.limit is not None and self.calls > self.after_calls
        hidden = self.first(x)
        if limited and self.where == "forward" and x.shape[0] > self.limit:
            raise out_of_memory(x.shape[0])
        if limited and self.where == "backward":
            hidden = FailsInBackward.apply(hidden, self.limit)
        prediction = self.last(hidden).squeeze(-1)
        return {"loss": nn.functional.mse_loss(prediction, y)}


def make_run(
    model: nn.Module, out: Path, *plugins: Any, batch_size: int = 8, accum: int = 2, **config: Any
) -> treadle.Run:
    options = dict(
        batch_size=batch_size, grad_accum_steps=accum, max_steps=4, log_every=1,
        output_dir=str(out), save_at_end=False,
    )  # fmt: skip
    return treadle.Run(
        model,
        toy.dataset(n=64),
        config=treadle.Config(**{**options, **config}),
        optimizer={"name": "sgd", "lr": 0.1},
        loggers=[],
        plugins=list(plugins),
    )


def limited(
    limit: int | None, where: str = "forward", after_calls: int = 0, norm: bool = True
) -> Limited:
    torch.manual_seed(0)
    return Limited(limit, where, after_calls, norm)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def reference(out: Path, **config: Any) -> treadle.Run:
    """Micro-batches of 2 with 4 times the accumulation, on a model without the limit."""
    run = make_run(limited(None), out, batch_size=2, accum=8, **config)
    run.fit()
    return run


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_split_run_equals_small_batches_with_more_accumulation(tmp_path: Path, where: str) -> None:
    plugin = AutoBatchSize()
    run = make_run(limited(2, where), tmp_path / "split", plugin)
    with pytest.warns(TreadleWarning, match="auto-batch-size") as caught:
        run.fit()
    messages = [str(w.message) for w in caught if "auto-batch-size" in str(w.message)]
    assert len(messages) == 2  # 8 -> 4 -> 2 rows
    assert "chunks of at most 2 rows (effective gradient accumulation 8" in messages[-1]
    assert plugin.micro_batch_size == 2 and run.state.step == 4
    small = reference(tmp_path / "small")
    # dropout masks, batch-norm statistics and gradients all as the small-batch run's
    assert_same_weights(run.model, small.model)
    assert run.state.last_metrics["loss"] == pytest.approx(small.state.last_metrics["loss"])


def test_equals_the_unsplit_run_within_tolerance(tmp_path: Path) -> None:
    """One injected failure at the first forward: the split run's weights equal those of the
    same run without the failure (and without the plugin), within float tolerance."""
    torch.manual_seed(0)
    split = make_run(toy.model(), tmp_path / "a", AutoBatchSize())
    torch.manual_seed(0)
    whole = make_run(toy.model(), tmp_path / "b")
    calls = []

    def fail_once(module: nn.Module, args: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise out_of_memory(8)

    split.model.register_forward_pre_hook(fail_once)
    with pytest.warns(TreadleWarning, match="chunks of at most 4 rows"):
        split.fit()
    whole.fit()
    for x, y in zip(split.model.parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_tokens_mode_sums_add(tmp_path: Path) -> None:
    def loss_sum(outputs: Any, batch: Any) -> treadle.LossSum:
        return treadle.LossSum(outputs["loss"] * batch["x"].shape[0], batch["x"].shape[0])

    def run_with(model: nn.Module, out: Path, *plugins: Any, **config: Any) -> treadle.Run:
        run = make_run(model, out, *plugins, loss_normalization="tokens", **config)
        run.loss_fn = loss_sum
        return run

    split = run_with(limited(2), tmp_path / "split", AutoBatchSize())
    with pytest.warns(TreadleWarning, match="auto-batch-size"):
        split.fit()
    small = run_with(limited(None), tmp_path / "small", batch_size=2, grad_accum_steps=8)
    small.fit()
    for x, y in zip(split.model.parameters(), small.model.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_out_of_memory_after_the_first_micro_batch_is_raised(tmp_path: Path) -> None:
    run = make_run(limited(2, after_calls=3), tmp_path, AutoBatchSize())
    with pytest.raises(PluginError, match="retrying is unsafe") as caught:
        run.fit()  # the kernel names the plugin whose hook the error came through
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert run.state.step == 1


def test_a_batch_of_one_still_out_of_memory_is_a_clear_error(tmp_path: Path) -> None:
    run = make_run(limited(0, norm=False), tmp_path, AutoBatchSize())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TreadleWarning)
        with pytest.raises(TreadleError, match=r"micro-batches of 1 row\(s\)"):
            run.fit()
    run = make_run(limited(3), tmp_path / "b", AutoBatchSize(min_micro_batch_size=4))
    with pytest.warns(TreadleWarning), pytest.raises(TreadleError, match="min_micro_batch_size=4"):
        run.fit()


@pytest.mark.timeout(60)
def test_resume_keeps_the_split(tmp_path: Path) -> None:
    whole = make_run(limited(2), tmp_path / "whole", AutoBatchSize(), max_steps=6)
    with pytest.warns(TreadleWarning):
        whole.fit()
    first = make_run(limited(2), tmp_path / "parts", AutoBatchSize(), max_steps=3, save_at_end=True)
    with pytest.warns(TreadleWarning):
        first.fit()
    plugin = AutoBatchSize()
    resumed = make_run(limited(2), tmp_path / "parts", plugin, max_steps=6, resume="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TreadleWarning)  # no second discovery: split from the start
        resumed.fit()
    assert plugin.micro_batch_size == 2
    assert_same_weights(whole.model, resumed.model)


def test_refused_where_unsafe(tmp_path: Path) -> None:
    class Engine(SingleDevice):
        def backward(self, loss: torch.Tensor) -> None:
            super().backward(loss)

    with pytest.raises(ConfigError, match="owns backward"):
        treadle.Run(toy.model(), toy.train_data(), strategy=Engine(), plugins=[AutoBatchSize()])

    class Sharded(SingleDevice):
        world_size = 2

    with pytest.raises(ConfigError, match="2 processes"):
        treadle.Run(toy.model(), toy.train_data(), strategy=Sharded(), plugins=[AutoBatchSize()])

    class Custom:
        @treadle.hookimpl
        def training_step(self) -> None:
            return None

    with pytest.raises(ConfigError, match="provides training_step"):
        treadle.Run(toy.model(), toy.train_data(), plugins=[AutoBatchSize(), Custom()])
    with pytest.raises(ConfigError, match="min_micro_batch_size"):
        AutoBatchSize(min_micro_batch_size=0)


def test_split_batch_cuts_rows_only() -> None:
    batch = {"x": torch.arange(10).view(5, 2), "scale": torch.tensor(2.0), "ids": [torch.ones(5)]}
    chunks = split_batch(batch, 5, 2)
    assert [c["x"].shape[0] for c in chunks] == [2, 2, 1]
    assert all(c["scale"] is batch["scale"] for c in chunks)
    assert torch.equal(torch.cat([c["x"] for c in chunks]), batch["x"])
    assert [c["ids"][0].shape[0] for c in chunks] == [2, 2, 1]


def test_found_by_name(tmp_path: Path) -> None:
    run = make_run(limited(4), tmp_path, "auto-batch-size")
    with pytest.warns(TreadleWarning, match="chunks of at most 4 rows"):
        run.fit()
