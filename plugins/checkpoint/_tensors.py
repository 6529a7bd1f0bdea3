"""Helpers shared by the checkpoint formats: atomic files, size strings, shared storage, keys."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from treadle.errors import CheckpointError, ConfigError, TreadleError
from treadle.plugins.checkpoint.files import open_regular

__all__ = [
    "StorageKey",
    "check_not_lfs_pointer",
    "checked_file_name",
    "describe_mismatch",
    "parse_size",
    "split_shared",
    "storage_key",
    "tensors_to_cpu",
    "write_atomically",
]

# (device, first byte, length): the same triple that transformers' ``id_tensor_storage`` and
# safetensors' ``_find_shared_tensors`` use, so we agree with them on what "shared" means.
StorageKey = tuple[torch.device, int, int]

_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
_SIZE_FORMS = (
    'a positive int (bytes) or a string such as "200MB", "5GB", "10KB", "1.5GiB" '
    "(KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024, B or no unit is bytes)"
)

# Every git-lfs pointer starts with this line; a real safetensors file starts with an 8-byte
# little-endian header length and a zip (torch.save) with "PK", so the test cannot misfire.
_LFS_PREFIX = b"version https://git-lfs"


def parse_size(value: int | str) -> int:
    """Turn a shard-size limit into a number of bytes.

    Args:
        value: bytes as an int, or a string with a decimal (``"5GB"``) or binary
            (``"1.5GiB"``) unit, case-insensitive.

    Returns:
        The limit in bytes (fractions of a byte are dropped).

    Raises:
        ConfigError: the value is not positive or not one of the accepted forms.
    """
    # bool is an int subclass; max_shard_size=True is certainly a mistake.
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"max_shard_size={value!r} must be {_SIZE_FORMS}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value)
        if match is not None:
            number, unit = match.groups()
            factor = _SIZE_UNITS.get(unit.lower() or "b")
            if factor is not None:
                size = int(float(number) * factor)
                if size > 0:
                    return size
    raise ConfigError(f"max_shard_size={value!r} is not allowed: use {_SIZE_FORMS}")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file in the same directory, fsync it, then rename.

    A crash at any instant leaves either the old file or the new one, never a torn one. The
    directory entry itself is made durable by the caller (the kernel fsyncs the directory).

    Args:
        path: the final file.
        write: called with the temporary path; it must create and fill that file.
    """
    # Same directory, so os.replace is a rename on one file system; a random part, so two
    # writers never share a temporary. Not mkstemp: its 0600 mode would survive the rename.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        # "r+b": fsync needs a writable handle on some platforms (Windows).
        with open(tmp, "r+b") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def checked_file_name(name: object, listed_in: Path) -> str:
    """``name``, read from ``listed_in``, if it is a plain file name (no folder, no ``..``).

    Raises:
        CheckpointError: any other name, which would read outside the checkpoint.
    """
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise CheckpointError(
            f"{listed_in} names the file {name!r}, which is not a plain file name"
        )
    return name


def check_not_lfs_pointer(path: Path) -> None:
    """Raise a clear error when ``path`` is a git-lfs pointer instead of the real file (or
    is not a regular file at all)."""
    with open_regular(path) as handle:
        head = handle.read(len(_LFS_PREFIX))
    if head == _LFS_PREFIX:
        raise TreadleError(
            f"{path} is a git-lfs pointer file, not the weights: the repository was cloned "
            "without its large files. Run `git lfs install && git lfs pull` in it, or download "
            "the file itself."
        )


def storage_key(tensor: torch.Tensor) -> StorageKey | None:
    """Identify the memory behind ``tensor``; None when it has none (empty or meta)."""
    if tensor.device.type == "meta" or tensor.layout != torch.strided:
        return None
    storage = tensor.untyped_storage()
    # Empty storages all report data_ptr 0: grouping them would invent aliases.
    if storage.nbytes() == 0 or storage.data_ptr() == 0:
        return None
    return (tensor.device, storage.data_ptr(), storage.nbytes())


def split_shared(
    tensors: Mapping[str, torch.Tensor], drop_first: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each piece of memory once: drop identical aliases, clone partial views.

    Names whose tensors are the same view of the same storage (same offset, shape, stride and
    dtype: tied weights) form one class; its first name is kept and the others become aliases
    of it. The order is: names for which ``drop_first`` is true last (a model's declared tied
    keys), then sorted. Tensors that share storage without being the same view (slices of one
    buffer, a transposed copy) are cloned, so each is written in full and reloads on its own,
    as transformers' ``save_pretrained`` does for disjoint views.

    Args:
        tensors: the named tensors to write.
        drop_first: names to prefer as aliases rather than as the stored name.

    Returns:
        ``(stored, aliases)``: the tensors to write, in the input order, and
        ``{alias name: stored name}``.
    """

    def rank(name: str) -> tuple[bool, str]:
        return (bool(drop_first and drop_first(name)), name)

    groups: dict[StorageKey, list[str]] = {}
    for name, tensor in tensors.items():
        key = storage_key(tensor)
        if key is not None:
            groups.setdefault(key, []).append(name)

    aliases: dict[str, str] = {}
    replaced: dict[str, torch.Tensor] = {}
    for names in groups.values():
        if len(names) == 1:
            continue
        views: dict[tuple[object, ...], list[str]] = {}
        for name in names:
            t = tensors[name]
            views.setdefault((t.storage_offset(), tuple(t.shape), t.stride(), t.dtype), []).append(
                name
            )
        classes = sorted(
            (sorted(members, key=rank) for members in views.values()), key=lambda c: rank(c[0])
        )
        for index, (kept, *others) in enumerate(classes):
            for other in others:
                aliases[other] = kept
            if index > 0:
                # Not the first view of this storage: give it memory of its own.
                replaced[kept] = tensors[kept].detach().clone(memory_format=torch.contiguous_format)

    stored = {
        name: replaced.get(name, tensor) for name, tensor in tensors.items() if name not in aliases
    }
    return stored, aliases


def tensors_to_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach and copy to CPU, keeping tensors that shared storage on the device sharing it.

    ``tensor.cpu()`` one by one would turn a tied embedding into two copies; copying each
    storage once and re-viewing it keeps ``torch.save``'s own de-duplication working.
    """
    moved: dict[StorageKey, torch.UntypedStorage] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        if tensor.device.type == "meta":
            raise TreadleError(f"tensor {name!r} is on the meta device and has no data to save")
        key = storage_key(tensor)
        if tensor.device.type == "cpu" or key is None:
            out[name] = tensor.cpu()
            continue
        if key not in moved:
            moved[key] = tensor.untyped_storage().cpu()
        out[name] = torch.empty(0, dtype=tensor.dtype).set_(
            moved[key], tensor.storage_offset(), tensor.shape, tensor.stride()
        )
    return out


def describe_mismatch(
    where: str,
    missing: Iterable[str],
    unexpected: Iterable[str],
    wrong_shape: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    limit: int = 20,
) -> str:
    """Say how a checkpoint's names (and shapes) differ from a model's, for an error message.

    Args:
        where: the checkpoint, as it should appear in the message.
        missing: names the model has and the checkpoint lacks.
        unexpected: names the checkpoint has and the model lacks.
        wrong_shape: ``{name: (checkpoint shape, model shape)}``.
        limit: how many names to show per list before summarising the rest.
    """

    def listing(names: list[str]) -> str:
        shown = ", ".join(names[:limit])
        more = len(names) - limit
        return shown + (f", ... and {more} more" if more > 0 else "")

    missing, unexpected = sorted(missing), sorted(unexpected)
    parts = [f"checkpoint {where} does not match the model."]
    if missing:
        parts.append(f"Missing keys (in the model, not in the checkpoint): {listing(missing)}.")
    if unexpected:
        parts.append(
            f"Unexpected keys (in the checkpoint, not in the model): {listing(unexpected)}."
        )
    if wrong_shape:
        shapes = [
            f"{k} (checkpoint {list(a)}, model {list(b)})"
            for k, (a, b) in sorted(wrong_shape.items())
        ]
        parts.append(f"Shape mismatches: {listing(shapes)}.")
    return " ".join(parts)
