"""The workload every conformance suite trains: a tiny residual regressor and its data."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["TinyBlock", "TinyModel", "tiny_data"]


class TinyBlock(nn.Module):
    """A residual tanh layer: a unit for sharding strategies to wrap."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


class TinyModel(nn.Module):
    """A small regressor; ``forward(x, y)`` returns ``{"loss": mse}``.

    Declares ``_no_split_modules`` (the transformers convention) so that sharding strategies
    find units to wrap without being told.
    """

    _no_split_modules: ClassVar[list[str]] = ["TinyBlock"]

    def __init__(self, features: int = 8, width: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.blocks = nn.Sequential(*(TinyBlock(width) for _ in range(blocks)))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        prediction = self.head(self.blocks(self.embed(x))).squeeze(-1)
        return {"loss": nn.functional.mse_loss(prediction, y)}


class _Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index]}


def tiny_data(n: int = 64, features: int = 8, seed: int = 1234) -> torch.utils.data.Dataset[Any]:
    """A map-style dataset of ``{"x", "y"}`` rows, the same for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = torch.sin(x.sum(-1))
    return _Rows(x, y)


def _model(seed: int) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel()


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
