"""``treadle export``: a checkpoint's weights as a weights-only folder, in any checkpoint format.

The folder is written with the ``directory`` store's protocol
(``treadle.plugins.checkpoint.directory``: temporary name, manifest with sizes and checksums,
rename), so ``treadle.load_weights`` verifies and
reads it like a checkpoint; the files for the tensors are the target format's
(``CheckpointFormat.export_model``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from treadle import registry
from treadle.components import CheckpointFormat
from treadle.errors import CheckpointError, ConfigError, TreadleError
from treadle.plugins.checkpoint.directory import resolve, write_folder
from treadle.plugins.checkpoint.files import LAYOUT_VERSION, read_meta, verify

__all__ = ["export"]


def export(
    checkpoint: Path | str, out: Path | str, *, format: str | Mapping[str, Any] = "safetensors"
) -> Path:
    """Write the weights of a checkpoint as a weights-only folder (``treadle export``).

    The folder holds the model files of ``format`` (for "safetensors": ``model.safetensors``
    or shards with an index, the Hugging Face layout; other formats may add files, through
    ``CheckpointFormat.export_model``), a ``state.json`` naming the format and the step, and
    a ``manifest.json``; it is written under a temporary name and renamed, like a
    checkpoint. ``treadle.load_weights`` reads it.

    Args:
        checkpoint: a checkpoint directory, a directory of checkpoints or a run's output
            directory.
        out: the folder to create; it must not exist yet (an empty directory is replaced).
        format: the checkpoint format to write: its ``treadle.checkpoint`` entry-point name,
            or ``{"name": ..., **options}`` with options for its constructor.

    Returns:
        ``out``.
    """
    directory, out = resolve(checkpoint), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TreadleError(f"{out} already exists; choose a new folder for the export")
    if out.is_symlink():
        raise TreadleError(f"{out} is a symbolic link; choose a new folder for the export")
    problems = verify(directory)
    if problems:
        raise CheckpointError(f"cannot export {directory}: {'; '.join(problems)}")
    meta = read_meta(directory)
    reader, writer = _format_named(meta["format"]), _format_named(format)
    tensors = reader.load_tensors(directory, "model")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "layout": LAYOUT_VERSION,
        "format": writer.name,
        "weights_only": True,
        "step": meta.get("step"),
        "source": str(directory.resolve()),
    }
    return write_folder(out, lambda folder: writer.export_model(directory, folder, tensors), meta)


def _format_named(spec: str | Mapping[str, Any]) -> CheckpointFormat:
    """A checkpoint format by entry-point name, or ``{"name": ..., **options}``."""
    options = dict(spec) if isinstance(spec, Mapping) else {}
    name = options.pop("name", None) if isinstance(spec, Mapping) else spec
    if not isinstance(name, str):
        raise ConfigError(f"a checkpoint format needs a name, got {spec!r}")
    target = registry.load("checkpoint", name)
    try:
        inspect.signature(target).bind(**options)
    except TypeError as exc:
        raise ConfigError(
            f"checkpoint format {name!r}: invalid options {sorted(options)}: {exc}"
        ) from None
    fmt = target(**options)
    if not isinstance(fmt, CheckpointFormat):
        raise TreadleError(f"checkpoint format {name!r} is not a treadle.CheckpointFormat")
    return fmt
