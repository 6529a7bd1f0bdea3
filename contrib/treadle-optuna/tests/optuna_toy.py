"""A small regression problem for the search tests: a linear model on 8 features of different
scales, trained with SGD, where the learning rate alone decides how far 30 steps get.

Factories named by the tests' run files (``optuna_toy:model`` ...): same seed, same data and
weights, so a trial and its best run file train identically.
"""

from __future__ import annotations

import torch

FEATURES = 8


class LinearRegressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(FEATURES, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), y)}


def model() -> LinearRegressor:
    return LinearRegressor()  # weights from the seed the run sets before calling the factory


def _batches(seed: int, count: int, size: int = 32) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.3, 2.0, FEATURES)  # an ill-conditioned problem: lr matters
    weights = torch.linspace(-1.0, 1.0, FEATURES)
    batches = []
    for _ in range(count):
        x = torch.randn(size, FEATURES, generator=generator) * scales
        y = x @ weights + 0.5 + 0.1 * torch.randn(size, generator=generator)
        batches.append({"x": x, "y": y})
    return batches


def train_data() -> list[dict[str, torch.Tensor]]:
    return _batches(seed=1, count=30)


def eval_data() -> list[dict[str, torch.Tensor]]:
    return _batches(seed=2, count=4)
