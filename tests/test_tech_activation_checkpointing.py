"""``activation-checkpointing``: less saved activation memory, the same losses and gradients."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import treadle
from treadle.errors import ConfigError
from treadle.plugins.techniques.activation_checkpointing import ActivationCheckpointing

WIDTH, DEPTH, BATCH = 32, 8, 64


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.drop = nn.Dropout(0.1)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.drop(torch.tanh(self.up(x))))


class DeepMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block() for _ in range(DEPTH)))
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.head(self.blocks(x)).squeeze(-1), y)}


def data(n: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "x": torch.randn(BATCH, WIDTH, generator=generator),
            "y": torch.randn(BATCH, generator=generator),
        }
        for _ in range(n)
    ]


class SavedBytes:
    """Bytes of tensors saved for backward and still alive (parameters not counted), and the
    peak of that sum: what activation checkpointing reduces."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {p.data_ptr() for p in model.parameters()}
        self.alive = 0
        self.peak = 0

    @contextmanager
    def counting(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def _pack(self, tensor: torch.Tensor) -> Any:
        return _Saved(self, tensor)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor


class _Saved:
    def __init__(self, counter: SavedBytes, tensor: torch.Tensor) -> None:
        self.counter, self.tensor = counter, tensor
        self.size = (
            0 if tensor.data_ptr() in counter.params else tensor.numel() * tensor.element_size()
        )
        counter.alive += self.size
        counter.peak = max(counter.peak, counter.alive)

    def __del__(self) -> None:
        self.counter.alive -= self.size


class Record:
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.grads: list[list[torch.Tensor]] = []

    @treadle.hookimpl
    def on_before_optimizer_step(self, run: treadle.Run) -> None:
        self.grads.append([p.grad.clone() for p in run.model.parameters()])

    @treadle.hookimpl
    def on_step_end(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach().clone())


def train(model: nn.Module, *plugins: Any, out: Path | None = None) -> tuple[Record, SavedBytes]:
    record, saved = Record(), SavedBytes(model)
    run = treadle.Run(
        model,
        data(),
        config=treadle.Config(
            max_steps=3, seed=0, output_dir=str(out or "runs/unused"), save_every=3
        ),
        optimizer={"name": "sgd", "lr": 0.05},
        loggers=[],
        checkpoint="safetensors" if out else None,
        plugins=[record, *plugins],
    )
    with saved.counting():
        run.fit()
    return record, saved


def assert_same_training(a: Record, b: Record) -> None:
    assert len(a.losses) == len(b.losses) == 3
    for x, y in zip(a.losses, b.losses, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for xs, ys in zip(a.grads, b.grads, strict=True):
        for x, y in zip(xs, ys, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.timeout(120)
def test_saved_activations_drop_and_losses_and_grads_are_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain_model = DeepMLP()
    model = copy.deepcopy(plain_model)
    keys = list(model.state_dict())
    plain, plain_saved = train(plain_model)
    checkpointed, saved = train(
        model, {"name": "activation-checkpointing", "modules": ["Block"]}, out=tmp_path
    )
    # each block keeps its input (BATCH x WIDTH) instead of ~4 tensors of 4 * WIDTH
    assert saved.peak < plain_saved.peak / 4, (saved.peak, plain_saved.peak)
    assert_same_training(plain, checkpointed)
    # the module tree and state_dict keys are unchanged: checkpoints interchange
    assert list(model.state_dict()) == keys
    assert all(isinstance(b, Block) and type(b).__name__ == "Block" for b in model.blocks)
    fresh = DeepMLP()
    treadle.load_weights(fresh, tmp_path)
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values())
    )
    plain_model.load_state_dict(model.state_dict())


def test_nested_matches_and_a_second_fit_wrap_once() -> None:
    torch.manual_seed(0)
    model = DeepMLP()
    plugin = ActivationCheckpointing(modules=[Block, "Linear"])
    plugin.apply(model)
    plugin.apply(model)
    block_type = type(model.blocks[0])
    # Linear inside a Block is not checkpointed again; the head (outside) is
    assert type(model.blocks[0].up) is nn.Linear
    assert type(model.head) is not nn.Linear and isinstance(model.head, nn.Linear)
    ActivationCheckpointing(modules=["Block"]).apply(model)  # a second plugin: no double wrap
    assert type(model.blocks[0]) is block_type and block_type.__bases__ == (Block,)
    clone = copy.deepcopy(model)  # a deep copy computes with its own weights
    with torch.no_grad():
        clone.head.bias.add_(1.0)
    batch = data(1)[0]
    assert not torch.equal(clone(**batch)["loss"], model(**batch)["loss"])


def test_no_matching_module_names_the_model_classes() -> None:
    with pytest.raises(
        ConfigError, match=r"\['Nope'\].*classes are: DeepMLP, Sequential, Block, Linear"
    ):
        treadle.Run(
            DeepMLP(),
            data(),
            loggers=[],
            plugins=[{"name": "activation-checkpointing", "modules": ["Nope"]}],
        )
    with pytest.raises(
        ConfigError,
        match=r"no activation_checkpointing_enable\(\) or gradient_checkpointing_enable",
    ):
        treadle.Run(DeepMLP(), data(), loggers=[], plugins=["activation-checkpointing"])


@pytest.mark.parametrize("modules", [[], [""], [3], ["Block", int]])
def test_bad_modules_option(modules: Any) -> None:
    with pytest.raises(ConfigError, match="modules"):
        ActivationCheckpointing(modules=modules)


@pytest.mark.timeout(120)
def test_hugging_face_gpt2_uses_its_own_gradient_checkpointing() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, use_cache=False
    )
    torch.manual_seed(0)
    plain_model = transformers.GPT2LMHeadModel(config)
    model = copy.deepcopy(plain_model)
    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 100, (4, 32), generator=generator)
        batches.append({"input_ids": ids, "labels": ids})

    def fit(m: nn.Module, *plugins: Any) -> tuple[Record, SavedBytes]:
        record, saved = Record(), SavedBytes(m)
        run = treadle.Run(
            m,
            batches,
            config=treadle.Config(max_steps=3, seed=0),
            optimizer={"name": "sgd", "lr": 0.05},
            loggers=[],
            checkpoint=None,
            plugins=[record, *plugins],
        )
        with saved.counting():
            run.fit()
        return record, saved

    plain, plain_saved = fit(plain_model)
    checkpointed, saved = fit(model, "activation-checkpointing")
    assert model.is_activation_checkpointing
    assert saved.peak < plain_saved.peak * 0.75, (saved.peak, plain_saved.peak)
    assert_same_training(plain, checkpointed)
