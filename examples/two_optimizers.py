"""A custom training step with two optimizers: a tiny GAN learns a 1-D Gaussian.

The kernel's optimizer trains the generator (``make_optimizer`` gives it only the generator's
parameters); the plugin below owns the discriminator's optimizer, updates it inside
``training_step``, and keeps its state in checkpoints, so a resumed run continues exactly.

    python examples/two_optimizers.py --steps 200 --out runs/gan
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

import treadle


class GAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 1))
        self.discriminator = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1))


class AdversarialStep:
    """One micro-batch: a discriminator update (its own optimizer), then the generator's loss,
    back-propagated through ``run.backward`` so the kernel's optimizer steps the generator."""

    def __init__(self, lr: float = 1e-3) -> None:
        self.lr = lr
        self.optimizer: torch.optim.Optimizer | None = None

    @treadle.hookimpl
    def make_optimizer(self, run: treadle.Run, model: GAN) -> torch.optim.Optimizer:
        self.optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=self.lr)
        return torch.optim.Adam(model.generator.parameters(), lr=self.lr)

    @treadle.hookimpl
    def training_step(self, run: treadle.Run, model: GAN, batch: torch.Tensor) -> torch.Tensor:
        assert self.optimizer is not None
        real = batch
        noise = torch.randn(len(real), 4)
        bce = nn.functional.binary_cross_entropy_with_logits
        fake = model.generator(noise)
        # the discriminator: real rows are 1, generated ones 0
        self.optimizer.zero_grad(set_to_none=True)
        d_real, d_fake = model.discriminator(real), model.discriminator(fake.detach())
        d_loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
        d_loss.backward()
        self.optimizer.step()
        # the generator: make the discriminator say 1
        d_on_fake = model.discriminator(fake)
        g_loss = bce(d_on_fake, torch.ones_like(d_on_fake))
        run.backward(g_loss)
        return g_loss.detach()

    @treadle.hookimpl
    def on_before_optimizer_step(self, run: treadle.Run) -> None:
        run.model.discriminator.zero_grad(set_to_none=True)  # g_loss reached it too

    @treadle.hookimpl
    def on_save_checkpoint(self, plugin_state: dict[str, Any]) -> None:
        assert self.optimizer is not None
        plugin_state["discriminator-optimizer"] = self.optimizer.state_dict()

    @treadle.hookimpl
    def on_load_checkpoint(self, run: treadle.Run, plugin_state: dict[str, Any]) -> None:
        if self.optimizer is None:
            self.make_optimizer(run, run.model)
        assert self.optimizer is not None
        self.optimizer.load_state_dict(plugin_state["discriminator-optimizer"])


def real_samples(count: int) -> torch.Tensor:
    return 3.0 + 0.5 * torch.randn(count, 1, generator=torch.Generator().manual_seed(0))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/gan")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = GAN()
    run = treadle.Run(
        model,
        train_data=torch.utils.data.DataLoader(real_samples(4096), batch_size=64, shuffle=True),
        config=treadle.Config(max_steps=args.steps, log_every=50, output_dir=args.out),
        plugins=[AdversarialStep()],
        loggers=["console"],
    )
    run.fit()
    with torch.no_grad():
        generated = model.generator(torch.randn(2048, 4))
    mean = float(generated.mean())
    print(f"generated mean {mean:.2f} (target 3.00), std {float(generated.std()):.2f} (0.50)")
    return mean


if __name__ == "__main__":
    main()
