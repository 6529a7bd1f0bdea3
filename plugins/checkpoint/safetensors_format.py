"""Safetensors checkpoints in the Hugging Face layout: shards, index, tied weights stored once.

Files for a stem ``model``: ``model.safetensors``, or ``model-00001-of-00003.safetensors`` ...
plus ``model.safetensors.index.json`` when there is more than one shard (the layout
``transformers``' ``save_pretrained`` writes and ``load_sharded_checkpoint`` reads). Every file
carries the header metadata ``{"format": "pt"}``.

Tensors that are the same view of the same memory (tied embeddings) are stored once under one
name; the others are recorded as aliases in the header metadata of the file that holds the
stored tensor, and in the index metadata, under ``"treadle_aliases"`` (a JSON object
``{alias: stored name}``). They are not in the index's ``weight_map``, exactly like
``save_pretrained`` leaves out ``_tied_weights_keys``, so Hugging Face loaders read the files
unchanged. Tensors that share memory without being the same view are written as copies.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from treadle.components import CheckpointFormat
from treadle.errors import TreadleError, TreadleWarning
from treadle.plugins.checkpoint._tensors import (
    check_not_lfs_pointer,
    checked_file_name,
    describe_mismatch,
    parse_size,
    split_shared,
    write_atomically,
)
from treadle.plugins.checkpoint.files import open_regular

__all__ = ["ALIASES_KEY", "LoadResult", "SafetensorsFormat", "load_weights_into"]

#: Header-metadata and index-metadata key that records tied names: ``{alias: stored name}``.
ALIASES_KEY = "treadle_aliases"


class LoadResult(NamedTuple):
    """What :func:`load_weights_into` did not match (both empty when ``strict=True``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class SafetensorsFormat(CheckpointFormat):
    """Write and read named tensors as (sharded) safetensors files.

    Args:
        max_shard_size: largest total tensor size per file, in bytes (int) or as a string
            such as ``"200MB"``, ``"5GB"``, ``"1.5GiB"``. A single tensor larger than the
            limit gets a file of its own. The default is ``save_pretrained``'s.

    Raises:
        ConfigError: ``max_shard_size`` is not a positive size.
    """

    name: ClassVar[str] = "safetensors"

    def __init__(self, max_shard_size: int | str = "5GB") -> None:
        self.max_shard_size = parse_size(max_shard_size)

    def save_tensors(
        self, directory: Path, stem: str, tensors: Mapping[str, torch.Tensor]
    ) -> list[str]:
        """Write ``tensors`` as ``{stem}.safetensors`` or as shards plus an index.

        Args:
            directory: an existing directory.
            stem: the file-name stem (``"model"``, ``"optimizer"``, ...).
            tensors: named tensors, on any device; aliased ones are stored once.

        Returns:
            The file names written, relative to ``directory`` (shards first, index last).
        """
        return _save(Path(directory), stem, tensors, self.max_shard_size, drop_first=None)

    def load_tensors(self, directory: Path, stem: str) -> dict[str, torch.Tensor]:
        """Read every tensor of ``stem`` to CPU, one file at a time, aliases filled back in.

        Raises:
            TreadleError: no such checkpoint, a missing shard, a git-lfs pointer, a file that
                is not safetensors or was written for another framework, an inconsistent index.
        """
        return _load_all(_read_checkpoint(Path(directory), stem))

    def save_model(
        self, directory: Path, model: nn.Module, state: Mapping[str, torch.Tensor]
    ) -> list[str]:
        """Write model weights as ``model*.safetensors``, tied weights stored once.

        Names the model declares in ``_tied_weights_keys`` (the transformers convention) become
        the aliases, so the stored name is the one transformers expects; otherwise the first
        name in sorted order is stored.

        Args:
            directory: an existing directory.
            model: the (unwrapped) model, read only for its declared tied keys.
            state: its state dict, as the strategy gathered it.

        Returns:
            The file names written, relative to ``directory``.
        """
        return _save(
            Path(directory), "model", state, self.max_shard_size, drop_first=_declared_tied(model)
        )

    def load_model(self, directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
        """Check the checkpoint's names and shapes against ``model``, then read it.

        Nothing is read before the check passes. Aliases map to the same tensor object as the
        stored name, so ``model.load_state_dict(result)`` fills both (and a tied model stays
        tied, since ``load_state_dict`` copies into the existing parameters).

        Raises:
            TreadleError: missing or unexpected keys (both listed) or shape mismatches, or any
                error of :meth:`load_tensors`.
        """
        checkpoint = _read_checkpoint(Path(directory), "model")
        _check_against(checkpoint, model, strict=True)
        return _load_all(checkpoint)


def load_weights_into(
    model: nn.Module, directory: Path | str, stem: str = "model", strict: bool = True
) -> LoadResult:
    """Load a safetensors checkpoint into ``model`` one file at a time (for inference).

    Names and shapes are checked first, from the file headers only; then each shard is read,
    copied into the model with ``load_state_dict(strict=False)`` and freed, so peak memory is
    the model plus one shard. Values are cast to the model's dtypes and devices. A model
    built entirely on the ``meta`` device is first materialised on CPU (keeping its tied
    parameters tied); its non-persistent buffers are not in any checkpoint and stay
    uninitialised (a warning names them).

    Args:
        model: the model to fill.
        directory: the checkpoint directory.
        stem: the file-name stem.
        strict: raise when names differ; when False, skip unexpected names and leave missing
            ones untouched.

    Returns:
        The missing and unexpected keys (empty when ``strict``).

    Raises:
        TreadleError: names differ (with ``strict``), shapes differ, or the files are invalid.

    Example:
        >>> model = build_model()  # doctest: +SKIP
        >>> load_weights_into(model, "runs/exp1/checkpoints/latest")  # doctest: +SKIP
    """
    checkpoint = _read_checkpoint(Path(directory), stem)
    missing, unexpected = _check_against(checkpoint, model, strict=strict)
    _materialize_meta(model)
    wanted = set(model.state_dict())
    for file, keys in checkpoint.keys_by_file.items():
        names_for = {key: [key] if key in wanted else [] for key in keys}
        for alias, stored in checkpoint.aliases.items():
            if stored in names_for and alias in wanted:
                names_for[stored].append(alias)
        shard: dict[str, torch.Tensor] = {}
        with safe_open(checkpoint.directory / file, framework="pt", device="cpu") as reader:
            for key, names in names_for.items():
                if names:
                    tensor = reader.get_tensor(key)
                    shard.update(dict.fromkeys(names, tensor))
        model.load_state_dict(shard, strict=False)
        # Free this shard before reading the next one: that is the point of sharding.
        del shard
    return LoadResult(sorted(missing), sorted(unexpected))


# -- writing


def _save(
    directory: Path,
    stem: str,
    tensors: Mapping[str, torch.Tensor],
    limit: int,
    drop_first: Callable[[str], bool] | None,
) -> list[str]:
    stored, aliases = split_shared(tensors, drop_first)
    for key, tensor in stored.items():
        if tensor.device.type == "meta":
            raise TreadleError(f"tensor {key!r} is on the meta device and has no data to save")
        if tensor.layout != torch.strided:
            raise TreadleError(
                f"tensor {key!r} has layout {tensor.layout}; safetensors stores dense tensors "
                "only (convert it with .to_dense(), or use the 'torch' checkpoint format)"
            )

    shards = _pack(stored, limit)
    count = len(shards)
    if count == 1:
        files = [f"{stem}.safetensors"]
    else:
        files = [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]

    for file, keys in zip(files, shards):
        metadata = {"format": "pt"}
        shard_aliases = {alias: kept for alias, kept in aliases.items() if kept in keys}
        if shard_aliases:
            metadata[ALIASES_KEY] = json.dumps(shard_aliases, sort_keys=True)
        # Copied to CPU one shard at a time, so a GPU model never needs a full CPU copy.
        cpu = {key: stored[key].detach().to("cpu").contiguous() for key in keys}
        write_atomically(
            directory / file,
            lambda tmp, cpu=cpu, metadata=metadata: save_file(cpu, tmp, metadata=metadata),
        )
        del cpu

    written = list(files)
    if count > 1:
        index_metadata: dict[str, Any] = {
            "total_size": sum(t.numel() * t.element_size() for t in stored.values())
        }
        if aliases:
            index_metadata[ALIASES_KEY] = dict(sorted(aliases.items()))
        index = {
            "metadata": index_metadata,
            "weight_map": {key: file for file, keys in zip(files, shards) for key in keys},
        }
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        index_name = f"{stem}.safetensors.index.json"
        # Written after every shard, so an index never names a shard that is not there yet.
        write_atomically(directory / index_name, lambda tmp: tmp.write_text(text, "utf-8"))
        written.append(index_name)
    _remove_stale(directory, stem, set(written))
    return written


def _pack(stored: Mapping[str, torch.Tensor], limit: int) -> list[list[str]]:
    # Greedy, in state-dict order, as save_pretrained does: a new shard when the next tensor
    # would overflow a non-empty one; a tensor larger than the limit gets a shard to itself.
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in stored.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _remove_stale(directory: Path, stem: str, written: set[str]) -> None:
    # A previous save with another shard count would leave files that a loader could pick up
    # (an old index next to a new single file); save_pretrained deletes them too.
    pattern = re.compile(rf"{re.escape(stem)}(-\d{{5,}}-of-\d{{5,}})?\.safetensors(\.index\.json)?")
    for path in directory.iterdir():
        if path.name not in written and pattern.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def _declared_tied(model: nn.Module) -> Callable[[str], bool] | None:
    # transformers declares tied names per model class: a list of (regex) names in v4, a dict
    # {tied name: source name} in v5, relative to the module that declares them.
    patterns: list[str] = []
    for prefix, module in model.named_modules():
        declared = getattr(module, "_tied_weights_keys", None)
        if not declared or not isinstance(declared, Mapping | list | tuple | set | frozenset):
            continue
        for key in declared:
            if isinstance(key, str):
                patterns.append(f"{re.escape(prefix)}\\.{key}" if prefix else key)
    if not patterns:
        return None

    def is_declared(name: str) -> bool:
        for pattern in patterns:
            try:
                if re.fullmatch(pattern, name):
                    return True
            except re.error:
                if pattern == name:
                    return True
        return False

    return is_declared


# -- reading


@dataclass
class _Checkpoint:
    """What the index and file headers say; no tensor data has been read."""

    directory: Path
    where: str
    keys_by_file: dict[str, list[str]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


def _read_checkpoint(directory: Path, stem: str) -> _Checkpoint:
    index_path = directory / f"{stem}.safetensors.index.json"
    single = directory / f"{stem}.safetensors"
    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        checkpoint = _Checkpoint(directory, str(index_path))
        weight_map, aliases = _read_index(index_path)
        checkpoint.aliases.update(aliases)
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        checkpoint = _Checkpoint(directory, str(single))
        files = [single.name]
    else:
        nearby = sorted(p.name for p in directory.glob(f"{stem}*")) if directory.is_dir() else []
        raise TreadleError(
            f"no safetensors checkpoint {stem!r} in {directory}: looked for {single.name} and "
            f"{index_path.name}. Files with that stem there: {', '.join(nearby) or 'none'}."
        )

    for file in files:
        path = directory / file
        if not path.is_file():
            raise TreadleError(f"{index_path} names the shard {file!r}, which does not exist")
        keys, shapes, aliases = _read_header(path)
        for key in keys:
            if key in checkpoint.shapes:
                raise TreadleError(f"tensor {key!r} is stored twice in {checkpoint.where}")
        checkpoint.keys_by_file[file] = keys
        checkpoint.shapes.update(shapes)
        checkpoint.aliases.update(aliases)

    if weight_map is not None:
        for key, file in weight_map.items():
            if key not in checkpoint.keys_by_file[file]:
                raise TreadleError(f"{index_path} places {key!r} in {file}, which lacks it")
    for alias, stored in checkpoint.aliases.items():
        if stored not in checkpoint.shapes or alias in checkpoint.shapes:
            raise TreadleError(
                f"{checkpoint.where}: the alias {alias!r} -> {stored!r} does not name a stored "
                "tensor, or shadows one"
            )
    return checkpoint


def _read_index(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    check_not_lfs_pointer(path)
    try:
        with open_regular(path) as handle:
            index = json.loads(handle.read().decode("utf-8"))
        weight_map = index["weight_map"]
        aliases = index.get("metadata", {}).get(ALIASES_KEY, {})
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise TreadleError(f"{path} is not a safetensors index: {exc}") from exc
    for mapping in (weight_map, aliases):
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
        ):
            raise TreadleError(f"{path} is not a safetensors index: expected name-to-name maps")
    for file in set(weight_map.values()):
        # Shard names are plain file names; anything else would read outside the checkpoint.
        checked_file_name(file, path)
    return weight_map, aliases


def _read_header(path: Path) -> tuple[list[str], dict[str, tuple[int, ...]], dict[str, str]]:
    check_not_lfs_pointer(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as reader:
            metadata = reader.metadata() or {}
            keys = list(reader.keys())
            shapes = {key: tuple(reader.get_slice(key).get_shape()) for key in keys}
    except Exception as exc:  # safetensors raises its own SafetensorError, and OSError
        raise TreadleError(f"{path} is not a readable safetensors file: {exc}") from exc
    # Files without metadata (plain safetensors.torch.save_file) are accepted, as transformers
    # accepts them; a declared other framework ("tf", "flax", "mlx") has other conventions.
    fmt = metadata.get("format")
    if fmt is not None and fmt != "pt":
        raise TreadleError(
            f"{path} declares format {fmt!r} in its header metadata; treadle reads PyTorch "
            'safetensors only (format "pt"). Convert it with the library that wrote it.'
        )
    aliases: dict[str, str] = {}
    if ALIASES_KEY in metadata:
        try:
            aliases = json.loads(metadata[ALIASES_KEY])
        except (ValueError, RecursionError) as exc:
            raise TreadleError(f"{path}: invalid {ALIASES_KEY!r} metadata: {exc}") from exc
        if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
        ):
            raise TreadleError(f"{path}: {ALIASES_KEY!r} metadata must map names to names")
    return keys, shapes, aliases


def _load_all(checkpoint: _Checkpoint) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file, keys in checkpoint.keys_by_file.items():
        with safe_open(checkpoint.directory / file, framework="pt", device="cpu") as reader:
            for key in keys:
                out[key] = reader.get_tensor(key)
    for alias, stored in checkpoint.aliases.items():
        # The same object, so a caller can tell the names were tied.
        out[alias] = out[stored]
    return out


def _check_against(
    checkpoint: _Checkpoint, model: nn.Module, *, strict: bool
) -> tuple[set[str], set[str]]:
    # Header shapes only: runs before any tensor is read, so a wrong checkpoint fails fast.
    model_shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    shapes = dict(checkpoint.shapes)
    for alias, stored in checkpoint.aliases.items():
        shapes[alias] = shapes[stored]
    missing = model_shapes.keys() - shapes.keys()
    unexpected = shapes.keys() - model_shapes.keys()
    wrong_shape = {
        key: (shapes[key], model_shapes[key])
        for key in shapes.keys() & model_shapes.keys()
        if shapes[key] != model_shapes[key]
    }
    if wrong_shape or (strict and (missing or unexpected)):
        raise TreadleError(
            describe_mismatch(
                checkpoint.where,
                missing if strict else (),
                unexpected if strict else (),
                wrong_shape,
            )
        )
    return set(missing), set(unexpected)


def _materialize_meta(model: nn.Module) -> None:
    tensors = [*model.parameters(), *model.buffers()]
    on_meta = [t.is_meta for t in tensors]
    if not any(on_meta):
        return
    if not all(on_meta):
        raise TreadleError(
            "the model has some tensors on the meta device and some not; build it entirely on "
            "meta (torch.device('meta')) or entirely on a real device before loading weights"
        )
    # to_empty gives every module its own new tensor, which would untie tied parameters:
    # remember which slots held the same object and point them at one object again.
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                slots.setdefault(id(tensor), []).append((module, attr))
    model.to_empty(device="cpu")
    for (first, first_attr), *others in slots.values():
        for module, attr in others:
            setattr(module, attr, getattr(first, first_attr))
    persistent = set(model.state_dict())
    transient = [name for name, _ in model.named_buffers() if name not in persistent]
    if transient:
        warnings.warn(
            f"non-persistent buffers {transient} are not saved in checkpoints and are left "
            "uninitialised after materialising the meta model; set them after loading",
            TreadleWarning,
            stacklevel=3,
        )
