"""``deepspeed``: checkpoints in DeepSpeed's own layout, written by the engine on every rank.

With ``strategy="deepspeed"`` a checkpoint's weights and optimizer state are DeepSpeed's native
files, written by ``engine.save_checkpoint`` (each rank its ZeRO partitions) and read back by
``engine.load_checkpoint``; nothing is gathered to one process. Everything else in the
checkpoint directory is the kernel's, as for every format: ``state.json``, the manifest, the
RNG states, the scheduler's and plugins' state (their tensors, if any, as safetensors).

Layout of the ``model/`` folder of a checkpoint::

    model/latest                    the tag of the engine checkpoint ("global_step120")
    model/global_step120/           DeepSpeed's files: mp_rank_00_model_states.pt,
                                    zero_pp_rank_<r>_mp_rank_00_optim_states.pt, ...
    model/zero_to_fp32.py           DeepSpeed's own consolidation script

A checkpoint resumes with the same number of ranks and the same ZeRO stage (DeepSpeed's rule
for its partitioned files). ``treadle export CKPT OUT`` (``treadle.plugins.export``)
consolidates it into a safetensors model in one process without a process group: the fp32
master weights for ZeRO 1-3 (DeepSpeed's ``zero_to_fp32``), the module's weights for stage 0.
``treadle.load_weights(model, CKPT)`` reads the same consolidated weights.

Safety: DeepSpeed's files are ``torch.save`` pickles. This format reads every one of them with
``torch.load(weights_only=True)``, DeepSpeed's own loaders included (through torch's
``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, set only while they run), admitting besides tensors and
plain containers only DeepSpeed's checkpoint bookkeeping classes (``ZeroStageEnum``,
``fragment_address``, ``LossScaler``, ``DynamicLossScaler``): a crafted file cannot run code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from treadle.errors import ConfigError, TreadleError, require
from treadle.hookspecs import hookimpl
from treadle.plugins.checkpoint._tensors import checked_file_name, describe_mismatch
from treadle.plugins.checkpoint.files import open_regular
from treadle.plugins.checkpoint.safetensors_format import SafetensorsFormat

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["DeepSpeedFormat", "EngineCheckpoint", "weights_only_loads"]

#: The folder of a checkpoint that holds the engine's files.
ENGINE_STEM = "model"


class EngineCheckpoint(Mapping[str, torch.Tensor]):
    """What a strategy whose engine saves itself returns as its sharded state dict.

    It holds no tensors: the ``deepspeed`` format calls ``save(folder)`` on every rank to
    write the engine's checkpoint (weights and optimizer state) and ``load(folder)`` to read
    it back into the engine.
    """

    def __init__(self, save: Callable[[Path], None], load: Callable[[Path], None]) -> None:
        self.save = save
        self.load = load

    def __getitem__(self, key: str) -> torch.Tensor:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class DeepSpeedFormat(SafetensorsFormat):
    """DeepSpeed's native checkpoint for weights and optimizer state; safetensors for the rest.

    Only for ``strategy="deepspeed"`` (checked when the run is composed).

    Args:
        max_shard_size: the largest safetensors file for the run's other tensors (scheduler,
            plugins), as for the ``safetensors`` format.
    """

    name: ClassVar[str] = "deepspeed"
    sharded: ClassVar[bool] = True

    @hookimpl
    def on_init_end(self, run: Run) -> None:
        from treadle.plugins.strategies.deepspeed import DeepSpeedStrategy

        if not isinstance(run.strategy, DeepSpeedStrategy):
            raise ConfigError(
                f"checkpoint 'deepspeed' stores a DeepSpeed engine's own checkpoint, so it needs "
                f"strategy 'deepspeed' (this run's strategy is {run.strategy.name!r}); use "
                "checkpoint='safetensors' or 'dcp' with it"
            )

    # ------------------------------------------------------------------ every rank

    def save_sharded(
        self, directory: Path, stem: str, tensors: Mapping[str, torch.Tensor]
    ) -> list[str]:
        """Collective: the engine writes its checkpoint into ``directory/model``.

        The optimizer's state is part of the engine's checkpoint, so the ``optimizer`` stem
        writes no file of its own.
        """
        directory = Path(directory)
        if isinstance(tensors, EngineCheckpoint):
            tensors.save(directory / stem)
            return sorted(
                p.relative_to(directory).as_posix()
                for p in (directory / stem).rglob("*")
                if p.is_file()
            )
        if tensors:
            raise TreadleError(
                f"checkpoint 'deepspeed' was given plain tensors for {stem!r}; it stores only "
                "what a DeepSpeed engine saves (use it with strategy 'deepspeed')"
            )
        return []

    def load_sharded(
        self, directory: Path, stem: str, template: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Collective: the engine reads its checkpoint back (weights and optimizer state)."""
        if isinstance(template, EngineCheckpoint):
            path = Path(directory) / stem
            if not (path / "latest").is_file():
                raise TreadleError(
                    f"{path} holds no DeepSpeed checkpoint (its 'latest' file is missing)"
                )
            template.load(path)
        return {}

    # ------------------------------------------------------------------ one process

    def save_model(
        self, directory: Path, model: nn.Module, state: Mapping[str, torch.Tensor]
    ) -> list[str]:
        raise TreadleError(
            "checkpoint 'deepspeed' writes only what a DeepSpeed engine saves; to write plain "
            "weights, export to 'safetensors' (treadle export CKPT OUT)"
        )

    def load_tensors(self, directory: Path, stem: str) -> dict[str, torch.Tensor]:
        """``model``: the consolidated weights (one process, no process group); other stems
        (scheduler, plugins) are safetensors files."""
        if stem == ENGINE_STEM:
            return consolidated_weights(Path(directory) / ENGINE_STEM)
        tensors: dict[str, torch.Tensor] = super().load_tensors(directory, stem)
        return tensors

    def load_model(self, directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
        """The consolidated weights, checked by name and shape against ``model``."""
        path = Path(directory) / ENGINE_STEM
        state = consolidated_weights(path)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        wrong = {
            k: (tuple(v.shape), expected[k])
            for k, v in state.items()
            if k in expected and tuple(v.shape) != expected[k]
        }
        missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
        if missing or unexpected or wrong:
            raise TreadleError(describe_mismatch(str(path), missing, unexpected, wrong))
        return state


# ---------------------------------------------------------------------- reading safely


def _allowed_classes() -> list[Any]:
    """DeepSpeed's bookkeeping classes found in its checkpoints; nothing that runs code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in the block is ``weights_only=True``, DeepSpeed's own included.

    Besides tensors and plain containers, only DeepSpeed's checkpoint bookkeeping classes are
    admitted. The environment variable that forces this is process-wide while the block runs.

    Raises:
        TreadleError: a file holds something else (the name of the refused class is given).
    """
    saved = {k: os.environ.get(k) for k in _FORCE_VARIABLES}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # both set is an error in torch
    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            yield
    except Exception as exc:
        if "Weights only load failed" in str(exc) or "weights_only" in str(exc):
            raise TreadleError(
                "refusing to unpickle a DeepSpeed checkpoint file: it holds an object that is "
                "not a tensor or one of DeepSpeed's checkpoint classes. If you trust the file, "
                "admit the class with torch.serialization.add_safe_globals([...]). "
                f"torch said: {_first_lines(str(exc))}"
            ) from exc
        raise
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_FORCE_VARIABLES = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")


def _first_lines(text: str, count: int = 6) -> str:
    lines = [line for line in text.splitlines() if "GLOBAL" in line or "Unsupported" in line]
    return " ".join(lines[:count]) or text.splitlines()[0]


def consolidated_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The full weights of the engine checkpoint in ``folder`` (its ``latest`` tag), on CPU.

    ZeRO 1-3: DeepSpeed's fp32 master weights, assembled from every rank's partition by
    ``deepspeed.utils.zero_to_fp32``. Stage 0: the module's weights as saved.

    Raises:
        TreadleError: no engine checkpoint in ``folder``.
        MissingDependencyError: DeepSpeed is not installed.
    """
    require("deepspeed", extra="deepspeed", what="reading a 'deepspeed' checkpoint")
    latest = folder / "latest"
    if not latest.is_file():
        raise TreadleError(f"{folder} holds no DeepSpeed checkpoint (its 'latest' file is missing)")
    with open_regular(latest) as handle:
        tag = handle.read(4096).decode("utf-8", "replace").strip()
    tag_dir = folder / checked_file_name(tag, latest)
    if tag_dir.is_symlink() or not tag_dir.is_dir():
        raise TreadleError(f"{latest} names {tag!r}, which is not a folder in {folder}")
    with weights_only_loads():
        if any(tag_dir.glob("*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(None):  # it prints its progress
                state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag_dir.name)
        else:  # stage 0: the optimizer's state is in the model file, the weights are whole
            files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
            if not files:
                raise TreadleError(f"{tag_dir} holds no DeepSpeed model states file")
            state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
