"""``torch.save`` checkpoints (``{stem}.pt``), read back only with ``weights_only=True``.

For tensors that safetensors cannot hold (sparse layouts) or for users who want one ``.pt``
file. Loading never unpickles arbitrary objects: ``torch.load`` runs with ``weights_only=True``,
whose restricted unpickler refuses any class or function outside tensors and plain containers,
so a file carrying a code-executing payload fails with an error instead of running it.
Shared storage (tied weights) is preserved by ``torch.save`` itself.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import torch

from treadle.components import CheckpointFormat
from treadle.errors import TreadleError
from treadle.plugins.checkpoint._tensors import (
    check_not_lfs_pointer,
    tensors_to_cpu,
    write_atomically,
)

__all__ = ["TorchFormat"]


class TorchFormat(CheckpointFormat):
    """Write named tensors with ``torch.save``; read them with ``torch.load(weights_only=True)``."""

    name: ClassVar[str] = "torch"

    def save_tensors(
        self, directory: Path, stem: str, tensors: Mapping[str, torch.Tensor]
    ) -> list[str]:
        """Write ``tensors`` to ``{stem}.pt`` atomically (temporary file, fsync, rename).

        Args:
            directory: an existing directory.
            stem: the file-name stem.
            tensors: named tensors on any device; they are copied to CPU, and tensors that
                share storage still share it in the file.

        Returns:
            ``["{stem}.pt"]``.
        """
        cpu = tensors_to_cpu(tensors)
        file = f"{stem}.pt"

        def write(tmp: Path) -> None:
            with open(tmp, "xb") as handle:
                torch.save(cpu, handle)

        write_atomically(Path(directory) / file, write)
        return [file]

    def load_tensors(self, directory: Path, stem: str) -> dict[str, torch.Tensor]:
        """Read ``{stem}.pt`` to CPU with ``weights_only=True``.

        Raises:
            TreadleError: the file is missing, is a git-lfs pointer, holds objects the safe
                unpickler refuses, is not a ``torch.save`` file, or is not a mapping of
                names to tensors.
        """
        path = Path(directory) / f"{stem}.pt"
        if not path.is_file():
            raise TreadleError(
                f"no torch checkpoint {stem!r} in {directory}: {path.name} is missing"
            )
        check_not_lfs_pointer(path)
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's own message suggests weights_only=False; treadle never does that.
            reason = str(exc).strip().splitlines()
            detail = next(
                (line for line in reason if "GLOBAL" in line), reason[-1] if reason else ""
            )
            raise TreadleError(
                f"refused to load {path}: torch.load(weights_only=True) rejected it because it "
                f"pickles objects other than tensors and plain containers ({detail.strip()}). "
                "Unpickling such a file can run arbitrary code, so treadle does not. If you "
                "trust its origin, convert it to safetensors in a separate, trusted step."
            ) from exc
        except Exception as exc:  # a damaged zip fails in many ways inside torch
            raise TreadleError(f"{path} is not a readable torch.save file: {exc}") from exc
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
        ):
            raise TreadleError(
                f"{path} does not hold a mapping of names to tensors "
                f"(found {type(loaded).__name__}); it was not written by a treadle format"
            )
        return loaded
