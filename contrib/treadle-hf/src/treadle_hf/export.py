"""The Hugging Face ``save_pretrained`` layout, from any treadle checkpoint.

Two ways in:

- :func:`export_pretrained` (and the console script ``treadle-hf export CKPT OUT``) turns any
  treadle checkpoint (safetensors, sharded, ``dcp``, tied weights) into a folder that
  ``AutoModel*.from_pretrained`` reads: ``config.json``, ``generation_config.json`` where the
  model has one, ``model.safetensors`` or shards with ``model.safetensors.index.json``, and the
  tokenizer files when a tokenizer is given. The weights are loaded with
  ``treadle.load_weights`` (checksums verified) into a freshly built model, which
  ``save_pretrained`` writes: transformers itself decides the names of tied weights, the
  shards and the index.
- :class:`HFFormat`, the checkpoint format ``hf`` (``checkpoint="hf"``), writes the weights as
  the ``safetensors`` format does and adds the model's ``config.json`` and
  ``generation_config.json`` to every checkpoint, as the HF ``Trainer`` does. Such a
  checkpoint reloads with ``from_pretrained`` as it is, and :func:`export_pretrained` needs no
  model or config to export it.

``treadle export --format hf CKPT OUT`` is the same export from the command line:
``treadle.plugins.export`` calls the format's ``export_model`` with the source checkpoint, whose
``config.json`` (or the ``config`` option: ``--option config=FOLDER``) tells which model to build.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

import treadle
from treadle import checkpoint as treadle_checkpoint
from treadle_hf._storage import SafetensorsBacked, check_new_folder, write_folder

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["HFFormat", "export_pretrained", "main"]

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def export_pretrained(
    checkpoint: Path | str,
    out: Path | str,
    model_or_config: PreTrainedModel | PretrainedConfig | Path | str | None = None,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write the weights of a treadle checkpoint as a ``save_pretrained`` folder.

    Args:
        checkpoint: a checkpoint directory, a directory of checkpoints (its newest valid one)
            or a run's output directory, in any treadle checkpoint format.
        out: the folder to create; it must not exist yet (an empty directory is replaced).
        model_or_config: what the checkpoint's model is: a ``PreTrainedModel`` (only its class
            and config are used; its weights are neither read nor changed), a
            ``PretrainedConfig`` whose ``architectures`` names the class, or a folder holding
            a ``config.json``. None: the ``config.json`` that the ``hf`` checkpoint format
            stores in each checkpoint.
        tokenizer: a tokenizer (anything with ``save_pretrained``) or a folder to load one
            from with ``AutoTokenizer``; its files are written next to the weights.
        max_shard_size: the largest weights file, as ``save_pretrained`` takes it.

    Returns:
        ``out``.

    Raises:
        treadle.TreadleError: no checkpoint there, a damaged one, no config to build the
            model from, weights that do not fit the model, or ``out`` exists.
    """
    directory, out = treadle_checkpoint.resolve(checkpoint), Path(out)
    check_new_folder(out)  # before building and loading the model, not after
    model = _fresh_model(model_or_config, directory)
    treadle.load_weights(model, directory)  # verifies every checksum first
    tokenizer = _tokenizer(tokenizer)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_folder(out, write)


class HFFormat(SafetensorsBacked):
    """Checkpoint format ``hf``: ``safetensors`` weights plus the model's ``config.json``.

    Every checkpoint also holds ``config.json`` (and ``generation_config.json`` where the
    model can generate), so it reloads with ``from_pretrained`` as it is. Tied weights are
    stored once under the name transformers expects. The model must be a transformers
    ``PreTrainedModel`` (checked when the run is composed).

    Args:
        max_shard_size: as for the ``safetensors`` format.
        config: for ``treadle export --format hf`` of a checkpoint written by another format:
            a folder holding the model's ``config.json`` (or that file).
        tokenizer: for ``treadle export``: a folder to load a tokenizer from, whose files are
            written beside the weights.
    """

    name: ClassVar[str] = "hf"

    def __init__(
        self,
        max_shard_size: int | str = "5GB",
        config: str | None = None,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__(max_shard_size)
        self.max_shard_size = max_shard_size
        self.config = config
        self.tokenizer = tokenizer

    def export_model(
        self, source: Path, directory: Path, state: Mapping[str, torch.Tensor]
    ) -> list[str]:
        """``treadle export --format hf``: the ``save_pretrained`` layout, as
        :func:`export_pretrained` writes it, of a model built from ``source``'s ``config.json``
        (or the ``config`` option) and loaded with the checkpoint's weights."""
        config = Path(self.config) if self.config is not None else None
        if config is not None and config.name == CONFIG_FILE:
            config = config.parent
        model = _fresh_model(config, source)
        treadle.load_weights(model, source)
        model.save_pretrained(directory, max_shard_size=self.max_shard_size)
        tokenizer = _tokenizer(self.tokenizer)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return sorted(path.name for path in Path(directory).iterdir())

    def save_model(
        self, directory: Path, model: nn.Module, state: Mapping[str, torch.Tensor]
    ) -> list[str]:
        """The weights, then ``config.json`` and ``generation_config.json`` beside them."""
        if not _is_pretrained(model):
            raise treadle.TreadleError(
                "the 'hf' checkpoint format writes config.json from the model, and was given "
                f"a {type(model).__name__}, not a transformers PreTrainedModel. `treadle "
                "export --format hf` hands the writer no model (the kernel passes tensors "
                "only): export with `treadle-hf export CKPT OUT [--config FOLDER]` or "
                "treadle_hf.export_pretrained(CKPT, OUT, model_or_config) instead"
            )
        files = self._weights.save_model(directory, model, state)
        return files + _write_configs(Path(directory), cast("PreTrainedModel", model))

    @treadle.hookimpl
    def on_init_end(self, run: treadle.Run) -> None:
        # Said when the run is composed, not at the first save after hours of training.
        if not _is_pretrained(run.model):
            raise treadle.ConfigError(
                f"checkpoint 'hf' needs a transformers PreTrainedModel (it stores its "
                f"config.json), got {type(run.model).__name__}; use checkpoint='safetensors'"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """``treadle-hf export CKPT OUT [--config FOLDER] [--tokenizer FOLDER]``."""
    parser = argparse.ArgumentParser(prog="treadle-hf", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export", help="write a checkpoint's weights as a from_pretrained folder"
    )
    export.add_argument("checkpoint", help="a checkpoint, a checkpoints/ dir or a run's output dir")
    export.add_argument("out", help="the folder to create")
    export.add_argument(
        "--config",
        default=None,
        help="a folder with the model's config.json (default: the one in the checkpoint, "
        "written by checkpoint='hf')",
    )
    export.add_argument("--tokenizer", default=None, help="a folder to load the tokenizer from")
    export.add_argument("--max-shard-size", default="5GB", help="largest weights file (5GB)")
    args = parser.parse_args(argv)
    try:
        out = export_pretrained(
            args.checkpoint,
            args.out,
            args.config,
            tokenizer=args.tokenizer,
            max_shard_size=args.max_shard_size,
        )
    except treadle.TreadleError as exc:
        print(f"treadle-hf: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {treadle_checkpoint.resolve(args.checkpoint)} to {out}")
    return 0


# ------------------------------------------------------------------ helpers


def _is_pretrained(model: object) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _write_configs(directory: Path, model: PreTrainedModel) -> list[str]:
    """``config.json`` (naming the model class, as ``save_pretrained`` does) and, where the
    model can generate, ``generation_config.json``."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.to_json_file(directory / CONFIG_FILE)
    written = [CONFIG_FILE]
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.to_json_file(directory / GENERATION_CONFIG_FILE)
        written.append(GENERATION_CONFIG_FILE)
    return written


def _fresh_model(spec: Any, checkpoint: Path) -> PreTrainedModel:
    """A new model of the checkpoint's class and config (random weights, soon replaced)."""
    import transformers

    if _is_pretrained(spec):
        model = type(spec)(copy.deepcopy(spec.config))
        if getattr(spec, "generation_config", None) is not None:
            model.generation_config = copy.deepcopy(spec.generation_config)
        return model  # type: ignore[no-any-return]
    folder = None
    if isinstance(spec, transformers.PretrainedConfig):
        config = copy.deepcopy(spec)
    else:
        folder = Path(spec) if spec is not None else checkpoint
        if not (folder / CONFIG_FILE).is_file():
            raise treadle.TreadleError(
                f"{folder} has no {CONFIG_FILE}, so the model to export cannot be built: pass "
                "the model, its config or a folder holding its config.json (--config), or "
                "train with checkpoint='hf', which stores it in every checkpoint"
            )
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise treadle.TreadleError(
            f"the config names no model class transformers has (architectures="
            f"{architectures!r}); pass the model itself, or set config.architectures"
        )
    model = cls(config)
    if folder is not None and model.can_generate() and (folder / GENERATION_CONFIG_FILE).is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return model  # type: ignore[no-any-return]


def _tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None or hasattr(tokenizer, "save_pretrained"):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
