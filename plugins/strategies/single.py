"""``single``: one process on one device (CUDA if available, else MPS, else CPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from treadle.components import Strategy
from treadle.errors import ConfigError

if TYPE_CHECKING:
    from treadle.run import Run


class SingleDevice(Strategy):
    """Train in this process on one device.

    Args:
        device: "auto" (CUDA, then MPS, then CPU), or any torch device string ("cpu", "cuda:1").
    """

    name = "single"

    def __init__(self, device: str = "auto") -> None:
        self.requested = device
        self.device = _choose(device)

    def setup(self, run: Run) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        super().setup(run)


def _choose(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"strategy 'single': device={device!r} is not a torch device ({exc})"
        ) from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "strategy 'single': device='cuda' was asked for, but CUDA is not available"
        )
    if chosen.type == "cuda" and chosen.index is None:
        # torch.cuda.set_device needs an index: "cuda" means the current device
        chosen = torch.device("cuda", torch.cuda.current_device())
    return chosen
