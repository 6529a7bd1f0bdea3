"""``dcp``: torch.distributed.checkpoint folders, in which every rank writes its own shards.

With a sharded strategy (``fsdp``) nothing is gathered to one process: each rank writes the
shards it holds of the weights and of the optimizer state, and reads back only what it needs,
so a checkpoint can be resumed by another number of ranks (DCP reshards on load). With a
replicated strategy (``ddp``, ``single``) each tensor is written once.

Files for a stem ``model``: the folder ``model/`` with DCP's ``.metadata`` and one
``__<rank>_0.distcp`` file per writing rank. The checkpoint directory around it (temporary
name, manifest, ``latest``) is the kernel's, as for every format.

Safety: tensor data is read by DCP with ``torch.load(weights_only=True)``. DCP's ``.metadata``
file is a pickle; it is read with an unpickler that admits only DCP's own metadata classes,
``torch.Size``, dtypes, layouts and paths, so a crafted file cannot run code. Entries that are
not tensors (DCP can store pickled objects) are refused, never unpickled.

``treadle.plugins.export.export(checkpoint, out)`` turns a ``dcp`` checkpoint into a
safetensors model folder (one process, no process group) that ``treadle.load_weights`` or
``safetensors.torch.load_file`` reads into a plain ``nn.Module``.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from treadle.components import CheckpointFormat
from treadle.errors import CheckpointError, ConfigError, TreadleError
from treadle.plugins.checkpoint._tensors import checked_file_name, describe_mismatch
from treadle.plugins.checkpoint.files import open_regular

__all__ = ["DCPFormat"]

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class DCPFormat(CheckpointFormat):
    """Write and read tensors with ``torch.distributed.checkpoint``, each rank its own shards.

    Args:
        thread_count: threads each rank uses to write its files.

    Raises:
        ConfigError: ``thread_count`` is not a positive integer.
    """

    name: ClassVar[str] = "dcp"
    sharded: ClassVar[bool] = True

    def __init__(self, thread_count: int = 1) -> None:
        if isinstance(thread_count, bool) or not isinstance(thread_count, int) or thread_count < 1:
            raise ConfigError(f"checkpoint 'dcp': thread_count={thread_count!r} must be >= 1")
        self.thread_count = thread_count

    # ------------------------------------------------------------------ every rank

    def save_sharded(
        self, directory: Path, stem: str, tensors: Mapping[str, torch.Tensor]
    ) -> list[str]:
        """Collective: every rank writes its shards of ``tensors`` under ``directory/stem``.

        Returns:
            The files of ``stem`` now present, relative to ``directory``.
        """
        self._save(Path(directory) / stem, tensors, distributed=True)
        return _files(Path(directory), stem)

    def load_sharded(
        self, directory: Path, stem: str, template: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Collective: read into ``template``'s tensors in place (each rank its own shards).

        Stored tensors that ``template`` does not name are read whole, on CPU; names of
        ``template`` that are not stored are left out of the result.

        Raises:
            TreadleError: no such checkpoint, a non-tensor entry, or shapes that differ.
        """
        return _load(Path(directory) / stem, template, distributed=True)

    # ------------------------------------------------------------------ one process

    def save_tensors(
        self, directory: Path, stem: str, tensors: Mapping[str, torch.Tensor]
    ) -> list[str]:
        """Write whole tensors from this process alone (no collective)."""
        self._save(Path(directory) / stem, tensors, distributed=False)
        return _files(Path(directory), stem)

    def load_tensors(self, directory: Path, stem: str) -> dict[str, torch.Tensor]:
        """Read every tensor of ``stem`` whole, on CPU, in this process alone (no collective)."""
        return _load(Path(directory) / stem, {}, distributed=False)

    def save_model(
        self, directory: Path, model: nn.Module, state: Mapping[str, torch.Tensor]
    ) -> list[str]:
        return self.save_tensors(directory, "model", state)

    def load_model(self, directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
        """Check names and shapes against ``model`` (from the metadata), then read whole."""
        path = Path(directory) / "model"
        stored = _tensor_entries(path, _read_metadata(path))
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        wrong = {
            k: (shape, expected[k])
            for k, shape in stored.items()
            if k in expected and shape != expected[k]
        }
        missing, unexpected = expected.keys() - stored.keys(), stored.keys() - expected.keys()
        if missing or unexpected or wrong:
            raise TreadleError(describe_mismatch(str(path), missing, unexpected, wrong))
        return _load(path, {}, distributed=False)

    def _save(self, path: Path, tensors: Mapping[str, torch.Tensor], *, distributed: bool) -> None:
        import torch.distributed.checkpoint as dcp

        writer = dcp.FileSystemWriter(path, sync_files=True, thread_count=self.thread_count)
        state = {key: value.detach() for key, value in tensors.items()}
        try:
            with _local_ok(distributed) as local:
                dcp.save(state, storage_writer=writer, no_dist=local)
        except Exception as exc:  # DCP wraps every rank's failure in a CheckpointException
            raise TreadleError(f"cannot write the dcp checkpoint {path}: {exc}") from exc


@contextlib.contextmanager
def _local_ok(distributed: bool) -> Iterator[bool]:
    """Yields whether the call is local (no collective); DCP's warning about it is expected."""
    import torch.distributed as dist

    # Without a process group (the ``single`` strategy, an offline export) every call is local.
    local = not (distributed and dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        if local:
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield local


def _files(directory: Path, stem: str) -> list[str]:
    return sorted(
        p.relative_to(directory).as_posix() for p in (directory / stem).rglob("*") if p.is_file()
    )


def _load(
    path: Path, template: Mapping[str, torch.Tensor], *, distributed: bool
) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    reader = _reader_class()(path)
    metadata = reader.read_metadata()
    stored = _tensor_entries(path, metadata)
    state: dict[str, torch.Tensor] = {}
    for key in stored:
        if key in template:
            state[key] = template[key]
        else:
            properties = metadata.state_dict_metadata[key].properties
            state[key] = torch.empty(stored[key], dtype=properties.dtype)
    try:
        with _local_ok(distributed) as local:
            dcp.load(state, storage_reader=reader, no_dist=local)
    except Exception as exc:
        raise TreadleError(f"cannot read the dcp checkpoint {path}: {exc}") from exc
    return state


def _tensor_entries(path: Path, metadata: Any) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the stored tensors; any other kind of entry is refused."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries: dict[str, tuple[int, ...]] = {}
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise TreadleError(
                f"the dcp checkpoint {path} stores {key!r} as a pickled object, not a tensor; "
                "treadle does not unpickle checkpoint contents. Re-save it with tensors only."
            )
        entries[key] = tuple(entry.size)
    return entries


def _check_storage(folder: Path, file: Path, metadata: Any, metadata_class: type) -> None:
    """Every data file that ``metadata`` names is a regular file directly in ``folder``: a
    ``relative_path`` that climbs out would read another checkpoint's (or any) file."""
    storage = getattr(metadata, "storage_data", None)
    if (
        not isinstance(metadata, metadata_class)
        or not isinstance(metadata.state_dict_metadata, dict)
        or not isinstance(storage, dict)
    ):
        raise CheckpointError(f"{file} is not a dcp metadata file (no tensor and storage tables)")
    for info in storage.values():
        name = checked_file_name(getattr(info, "relative_path", None), file)
        open_regular(folder / name).close()


def _read_metadata(path: Path) -> Any:
    return _reader_class()(path).read_metadata()


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP's metadata is made of."""

    def find_class(self, module: str, name: str) -> Any:
        if module == _METADATA_MODULE:
            import importlib

            target = getattr(importlib.import_module(module), name, None)
            if isinstance(target, type) and target.__module__ == module:
                return target
        elif (module, name) in _ALLOWED:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not part of DCP checkpoint metadata; refusing to unpickle it"
        )


@functools.cache
def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):  # type: ignore[misc]
        """DCP's file reader, with its metadata read by ``_MetadataUnpickler``."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            file = Path(self.path) / name
            if not file.is_file():
                raise TreadleError(
                    f"no dcp checkpoint at {self.path}: {name} is missing"
                    + ("" if Path(self.path).is_dir() else " (and so is the folder)")
                )
            try:
                with open_regular(file) as handle:
                    metadata = _MetadataUnpickler(handle).load()
            except CheckpointError:
                raise
            except Exception as exc:  # a damaged pickle fails in many ways
                raise TreadleError(f"{file} is not a readable dcp metadata file: {exc}") from exc
            _check_storage(Path(self.path), file, metadata, Metadata)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader
