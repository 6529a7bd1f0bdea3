"""What ``run.toml`` names by import path: the model and the data, built in code."""

from __future__ import annotations

import torch
from torch import nn


class Regressor(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.net(x).squeeze(-1), y)}


def model(width: int = 32) -> Regressor:
    return Regressor(width)


class Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(count, 4, generator=generator)
        self.y = torch.sin(self.x.sum(-1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index]}


def train_data(count: int = 1024) -> Rows:
    return Rows(count, seed=0)


def eval_data(count: int = 256) -> Rows:
    return Rows(count, seed=1)
