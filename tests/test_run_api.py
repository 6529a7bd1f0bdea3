"""The Run API: components and plugins in every accepted form, requests, refits, providers."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import toy
from torch import nn

import treadle
from treadle.plugins.precision import FP32
from treadle.plugins.strategies.single import SingleDevice


def config(tmp_path: Path, **fields: Any) -> treadle.Config:
    return treadle.Config(output_dir=str(tmp_path), **{"max_steps": 4, "log_every": 1, **fields})


class Logs:
    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []

    @treadle.hookimpl
    def on_log(self, metrics: dict[str, float]) -> None:
        self.records.append(dict(metrics))


def test_components_as_names_mappings_and_instances(tmp_path: Path) -> None:
    optimizer_model = toy.model()
    optimizer = torch.optim.SGD(optimizer_model.parameters(), lr=0.1)
    run = treadle.Run(
        optimizer_model,
        toy.train_data(),
        config=config(tmp_path),
        strategy=SingleDevice(device="cpu"),
        precision={"name": "fp32"},
        optimizer=optimizer,
        scheduler=lambda opt, total_steps: torch.optim.lr_scheduler.StepLR(
            opt, step_size=2, gamma=0.5
        ),
        loggers=[],
        checkpoint={"name": "safetensors"},
    )
    logs = Logs()
    run.add_plugin(logs)
    run.fit()
    assert run.optimizer is optimizer
    assert isinstance(run.precision, FP32)
    assert [r["lr"] for r in logs.records] == [0.1, 0.05, 0.05, 0.025]


def test_plugins_as_module_name_mapping_and_object(tmp_path: Path) -> None:
    module = types.ModuleType("my_hooks")
    module.steps = []  # type: ignore[attr-defined]

    @treadle.hookimpl
    def on_step_end(run: treadle.Run) -> None:
        module.steps.append(run.state.step)  # type: ignore[attr-defined]

    module.on_step_end = on_step_end  # type: ignore[attr-defined]
    logs = Logs()
    run = treadle.Run(
        toy.model(),
        toy.train_data(),
        eval_data=toy.train_data(n=16),
        config=config(tmp_path, max_steps=50, eval_every=1),
        loggers=[],
        checkpoint=None,
        plugins=[
            module,
            {"name": "early-stopping", "monitor": "eval/loss", "patience": 1, "threshold": 10.0},
            logs,
        ],
    )
    run.fit()
    assert module.steps == [1, 2]  # early stopping: no eval improves by 10.0 → stop after 1 bad
    assert run.state.stop_reason is not None and "early stopping" in run.state.stop_reason


def test_loss_fn_with_tuple_batches_and_dataset_with_batch_size(tmp_path: Path) -> None:
    x, y = toy.samples(32)
    model = nn.Linear(4, 1)
    dataset = torch.utils.data.TensorDataset(x, y)
    seen_shapes = []

    def loss_fn(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        seen_shapes.append(tuple(outputs.shape))
        return nn.functional.mse_loss(outputs.squeeze(-1), batch[1])

    run = treadle.Run(
        model,
        dataset,
        config=config(tmp_path, max_steps=None, max_epochs=2, batch_size=8),
        loss_fn=loss_fn,
        loggers=[],
        checkpoint=None,
    )
    run.fit()
    assert run.state.step == 8 and run.state.epoch == 2
    assert seen_shapes == [(8, 1)] * 8
    assert run.state.samples_seen == 64


def test_requests_are_acted_on_at_the_next_boundary(tmp_path: Path) -> None:
    class Requester:
        @treadle.hookimpl
        def on_step_end(self, run: treadle.Run) -> None:
            if run.state.step == 2:
                run.request_log()
                run.request_eval()
                run.request_save()
            if run.state.step == 3:
                run.request_stop("enough")

    logs = Logs()
    run = treadle.Run(
        toy.model(),
        toy.train_data(),
        eval_data=toy.train_data(n=16),
        config=config(tmp_path, max_steps=10, log_every=0, eval_at_end=False, save_at_end=False),
        loggers=[],
        plugins=[Requester(), logs],
    )
    run.fit()
    assert run.state.step == 3 and run.state.stop_reason == "enough"
    assert [sorted(r) for r in logs.records][:2] == [
        sorted(["step", "epoch", "loss", "lr", "step_time_s", "samples_per_s"]),
        sorted(["step", "epoch", "eval/loss"]),
    ]
    assert [r["step"] for r in logs.records] == [2, 2, 3]  # the tail step is logged at the end
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000002"]


def test_fit_again_keeps_optimizer_state_and_counts_on(tmp_path: Path) -> None:
    run = treadle.Run(
        toy.model(),
        toy.train_data(),
        config=config(tmp_path, save_at_end=False),
        optimizer={"name": "adam", "lr": 0.01},
        loggers=[],
    )
    run.fit()
    optimizer = run.optimizer
    assert optimizer is not None
    first_param = next(iter(optimizer.state.values()))
    assert int(first_param["step"]) == 4
    run.fit(train_data=toy.train_data(n=32, seed=9), max_steps=10)
    assert run.optimizer is optimizer and int(first_param["step"]) == 10
    assert run.state.step == 10


def test_evaluate_named_sets_and_predict_order(tmp_path: Path) -> None:
    run = treadle.Run(
        toy.model(), toy.train_data(), loggers=[], checkpoint=None, config=config(tmp_path)
    )
    a, b = toy.train_data(n=16, seed=1), toy.train_data(n=24, seed=2)
    metrics = run.evaluate({"a": a, "b": b})
    assert sorted(metrics) == ["a/loss", "b/loss"]
    model = run.model.eval()
    with torch.no_grad():
        expected_a = torch.stack([model(**batch)["loss"] for batch in a]).mean().item()
    assert metrics["a/loss"] == pytest.approx(expected_a, rel=1e-6)
    predictions = run.predict(b)
    assert [p["prediction"].shape[0] for p in predictions] == [8, 8, 8]
    with torch.no_grad():
        assert torch.equal(predictions[1]["prediction"], model(**b[1])["prediction"])


def test_custom_training_step_with_two_optimizers(tmp_path: Path) -> None:
    """A GAN-style update is a provider hook, not a subclass."""

    class TwoUpdates:
        def __init__(self) -> None:
            self.second = nn.Linear(1, 1)
            self.second_optimizer = torch.optim.SGD(self.second.parameters(), lr=0.1)
            self.calls = 0

        @treadle.hookimpl
        def training_step(self, run: treadle.Run, model: nn.Module, batch: Any) -> torch.Tensor:
            self.calls += 1
            loss = model(**batch)["loss"]
            run.backward(loss)
            self.second_optimizer.zero_grad()
            side = self.second(loss.detach().view(1, 1)).pow(2).sum()
            side.backward()
            self.second_optimizer.step()
            return loss

    plugin = TwoUpdates()
    before = plugin.second.weight.detach().clone()
    run = treadle.Run(
        toy.model(),
        toy.train_data(),
        config=config(tmp_path, save_at_end=False),
        loggers=[],
        plugins=[plugin],
    )
    run.fit()
    assert plugin.calls == 4
    assert not torch.equal(before, plugin.second.weight)


def test_compute_loss_provider_wins_over_default(tmp_path: Path) -> None:
    class ZeroLoss:
        @treadle.hookimpl
        def compute_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
            return model(**batch)["loss"] * 0.0

    model = toy.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    treadle.Run(
        model,
        toy.train_data(),
        config=config(tmp_path, save_at_end=False),
        optimizer={"name": "sgd", "lr": 0.5},
        loggers=[],
        plugins=[ZeroLoss()],
    ).fit()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_output_dir_and_hparams(tmp_path: Path) -> None:
    run = treadle.Run(
        toy.model(),
        toy.train_data(),
        config=config(tmp_path / "deep" / "dir"),
        optimizer={"name": "adamw", "lr": 0.001},
        loggers=[],
        checkpoint=None,
    )
    hparams = run.hparams()
    assert hparams["max_steps"] == 4 and hparams["strategy"] == "single"
    assert hparams["optimizer"] == {"name": "adamw", "lr": 0.001}
    run.fit()
    assert (tmp_path / "deep" / "dir").is_dir()


def test_public_surface_is_small_and_typed() -> None:
    assert len(treadle.__all__) <= 25
    from importlib import resources

    assert resources.files("treadle").joinpath("py.typed").is_file()
    assert (
        "treadle.plugins.precision" in sys.modules
    )  # imported by this test module, not by treadle


def test_standard_dataloaders_are_resampled_even_over_plain_lists(tmp_path: Path) -> None:
    from treadle.data import ResumableSampler
    from treadle.plugins import defaults

    rows = [{"x": torch.randn(4), "y": torch.randn(())} for _ in range(10)]
    run = treadle.Run(
        toy.model(), rows, config=config(tmp_path, seed=3), loggers=[], checkpoint=None
    )
    for shuffle in (True, False):
        given = torch.utils.data.DataLoader(rows, batch_size=4, shuffle=shuffle)
        loader = defaults.make_train_loader(run, given)
        assert isinstance(loader.sampler, ResumableSampler)
        assert loader.sampler.shuffle is shuffle and loader.sampler.seed == 3
        assert [len(b["x"]) for b in loader] == [4, 4, 2]
    custom = torch.utils.data.DataLoader(rows, batch_sampler=[[0, 1], [2, 3]])
    assert defaults.make_train_loader(run, custom) is custom  # a custom sampler is kept


def test_single_device_cuda_without_index_means_the_current_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from treadle.plugins.strategies import single

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert single._choose("cuda") == torch.device("cuda", 3)
    assert single._choose("cuda:1") == torch.device("cuda", 1)
