"""What the ``hf`` and ``adapter`` formats and the exports share: folders written under a
temporary name, and tensor files written by treadle's own ``safetensors`` format."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

import treadle
from treadle import registry


def check_new_folder(out: Path) -> None:
    """``out`` may be created: it does not exist, or is an empty directory (not a link)."""
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise treadle.TreadleError(f"{out} already exists; choose a new folder")


def write_folder(out: Path, write: Callable[[Path], object]) -> Path:
    """Create ``out`` by ``write(tmp)`` into a temporary folder renamed into place: a reader
    never sees a half-written folder, and a failed write leaves nothing behind."""
    check_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    remove(tmp)
    try:
        write(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        remove(tmp)
        raise
    return out


def remove(path: Path) -> None:
    """Delete ``path`` whatever it is; a link is unlinked, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


class SafetensorsBacked(treadle.CheckpointFormat):
    """A format whose tensor files are the ``safetensors`` format's (found by its entry point,
    the public way to it); subclasses change what the model files hold."""

    def __init__(self, max_shard_size: int | str = "5GB") -> None:
        self._weights: treadle.CheckpointFormat = registry.load("checkpoint", "safetensors")(
            max_shard_size=max_shard_size
        )

    def save_tensors(
        self, directory: Path, stem: str, tensors: Mapping[str, torch.Tensor]
    ) -> list[str]:
        return self._weights.save_tensors(directory, stem, tensors)

    def load_tensors(self, directory: Path, stem: str) -> dict[str, torch.Tensor]:
        return self._weights.load_tensors(directory, stem)

    def load_model(self, directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
        return self._weights.load_model(directory, model)
