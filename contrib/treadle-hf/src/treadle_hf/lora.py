"""LoRA (and any other ``peft`` adapter) on treadle: train the adapter alone, store it alone.

Three pieces, each usable without the others:

- the plugin ``lora`` (:class:`LoRA`): ``plugins=[{"name": "lora", "r": 8}]`` puts the adapter
  into ``run.model`` when the run is composed (``on_init_end``), before the strategy wraps the
  model and before the optimizer is built, so only adapter parameters reach the optimizer
  (treadle's optimizers leave frozen parameters out). ``peft`` injects its layers into the
  model in place, so ``run.model`` stays the user's model object.
- the checkpoint format ``adapter`` (:class:`AdapterFormat`): ``checkpoint="adapter"`` stores
  every tensor of the model's state except its frozen parameters, i.e. the adapter, in
  safetensors. Resuming reads the adapter back and keeps the frozen base weights the model was
  built with: build the base model the same way (same ``from_pretrained`` folder, or seed).
- :func:`apply`, :func:`save_adapter`, :func:`save_merged` and :func:`export_adapter` for
  scripts: the adapter folder reloads with ``PeftModel.from_pretrained(base, folder)``; the
  merged folder is a plain model folder for ``AutoModel*.from_pretrained``.

``peft`` is imported only when an adapter is applied: ``pip install "treadle-hf[peft]"``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

import treadle
from treadle_hf._storage import SafetensorsBacked, remove, write_folder

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

__all__ = [
    "AdapterFormat",
    "LoRA",
    "apply",
    "export_adapter",
    "lora_config",
    "save_adapter",
    "save_merged",
]


def lora_config(
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
    **options: Any,
) -> PeftConfig:
    """A ``peft.LoraConfig``; ``target_modules=None`` takes peft's default for the model type.

    Other ``LoraConfig`` fields (``bias``, ``modules_to_save``, ``use_rslora``, ...) pass
    through ``options``.
    """
    peft = _peft()
    targets = [target_modules] if isinstance(target_modules, str) else target_modules
    return peft.LoraConfig(  # type: ignore[no-any-return]
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets) if targets is not None else None,
        **options,
    )


def apply(
    model: nn.Module,
    config: PeftConfig | None = None,
    *,
    seed: int | None = None,
    **lora_options: Any,
) -> PeftModel:
    """Put a peft adapter into ``model`` in place and freeze everything else.

    Args:
        model: the base model; after the call its target layers carry the adapter and only
            adapter parameters require gradients. Train ``model`` itself (or the result).
        config: any ``peft`` config (LoRA, IA3, ...); by default :func:`lora_config` built
            from ``lora_options`` (``r``, ``alpha``, ``dropout``, ``target_modules``, ...).
        seed: the adapter's initial weights are drawn from a generator seeded with it, leaving
            the global random streams untouched; None draws from the global stream.

    Returns:
        the ``PeftModel`` wrapping ``model`` (for ``save_pretrained`` of the adapter).
    """
    peft = _peft()
    if config is None:
        config = lora_config(**lora_options)
    elif lora_options:
        raise treadle.ConfigError(
            f"pass either a peft config or LoRA options, not both (got {sorted(lora_options)})"
        )
    if seed is None:
        return peft.get_peft_model(model, config)  # type: ignore[no-any-return]
    # Its own stream: the same seed gives the same adapter however the run is composed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)  # type: ignore[no-any-return]


def save_adapter(peft_model: PeftModel, out: Path | str) -> Path:
    """Write the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``PeftModel.from_pretrained(base, out)`` reads."""
    return write_folder(Path(out), lambda tmp: peft_model.save_pretrained(tmp))


def save_merged(
    peft_model: PeftModel, out: Path | str, *, max_shard_size: int | str = "5GB"
) -> Path:
    """Write a plain model folder with the adapter merged into the base weights.

    The merge happens on a copy, so ``peft_model`` keeps training unchanged. Merged logits
    equal the adapter model's up to rounding (``W x + B(A x)`` and ``(W + BA) x`` round
    differently), not bit for bit.
    """
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return write_folder(
        Path(out), lambda tmp: merged.save_pretrained(tmp, max_shard_size=max_shard_size)
    )


def export_adapter(
    checkpoint: Path | str,
    out: Path | str,
    base_model: nn.Module,
    config: PeftConfig | None = None,
    *,
    merge: bool = False,
    **lora_options: Any,
) -> Path:
    """Write the adapter of an ``adapter``-format checkpoint as a peft folder (or, with
    ``merge=True``, as a merged plain model folder).

    Args:
        checkpoint: a checkpoint, a checkpoints/ directory or a run's output directory.
        out: the folder to create.
        base_model: the base model the run trained on; it receives the adapter in place.
        config, lora_options: the adapter, as given to the ``lora`` plugin.
        merge: write ``merge_and_unload()``'s plain model instead of the adapter.
    """
    peft_model = apply(base_model, config, **lora_options)
    treadle.load_weights(base_model, checkpoint)
    return save_merged(peft_model, out) if merge else save_adapter(peft_model, out)


class LoRA:
    """Plugin ``lora``: train a peft adapter instead of the whole model.

    Args:
        r, alpha, dropout, target_modules: the LoRA rank, scaling numerator, dropout on the
            adapter's input and the modules to adapt (None: peft's default for the model).
        config: a ``peft`` config object instead (LoRA or any other adapter type).
        export_dir: at the end of ``fit``, write the adapter folder there (main process).
        merge: write a merged plain model folder to ``export_dir`` instead of the adapter.

    After the run is composed, ``plugin.peft_model`` is the ``PeftModel`` around
    ``run.model``; :meth:`save_adapter` and :meth:`save_merged` write it at any time.
    """

    name = "lora"

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: Sequence[str] | str | None = None,
        *,
        config: PeftConfig | None = None,
        export_dir: str | None = None,
        merge: bool = False,
    ) -> None:
        _peft()  # a missing peft fails when the run is composed, naming the install
        self.config = (
            config if config is not None else lora_config(r, alpha, dropout, target_modules)
        )
        self.export_dir = export_dir
        self.merge = merge
        self.peft_model: PeftModel | None = None
        self._exported = False  # export_dir holds this plugin's own export (a second fit)

    @treadle.hookimpl
    def on_init_end(self, run: treadle.Run) -> None:
        # The last moment before compute: the strategy wraps run.model and the optimizer
        # collects its trainable parameters only later, in fit().
        if run.optimizer is not None:
            raise treadle.ConfigError("plugin 'lora' must be applied before the optimizer exists")
        if self.export_dir is not None and run.is_main_process:
            out = Path(self.export_dir)
            if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
                raise treadle.ConfigError(
                    f"plugin 'lora': export_dir {out} already exists; choose a new folder"
                )
        self.peft_model = apply(run.model, self.config, seed=run.config.seed)
        if run.checkpoint_format is not None and not isinstance(
            run.checkpoint_format, AdapterFormat
        ):
            warnings.warn(
                f"plugin 'lora': checkpoint format {run.checkpoint_format.name!r} stores the "
                "whole model in every checkpoint; pass checkpoint='adapter' to store the "
                "adapter alone",
                treadle.TreadleWarning,
                stacklevel=2,
            )

    @treadle.hookimpl
    def on_fit_end(self, run: treadle.Run) -> None:
        if self.export_dir is not None and run.is_main_process:
            out = Path(self.export_dir)
            if self._exported:
                remove(out)  # this plugin's export from an earlier fit(): replaced
            self.save_merged(out) if self.merge else self.save_adapter(out)
            self._exported = True

    def save_adapter(self, out: Path | str) -> Path:
        return save_adapter(self._applied(), out)

    def save_merged(self, out: Path | str) -> Path:
        return save_merged(self._applied(), out)

    def _applied(self) -> PeftModel:
        if self.peft_model is None:
            raise treadle.TreadleError("plugin 'lora' has no adapter yet: compose a Run with it")
        return self.peft_model


class AdapterFormat(SafetensorsBacked):
    """Checkpoint format ``adapter``: the model's state without its frozen parameters.

    What trains (the adapter, and any parameter left trainable) and the buffers are stored in
    safetensors, as the ``safetensors`` format stores them; frozen parameters are not. Loading
    returns the model's own tensors for the frozen names, so a run resumes exactly on the
    same base weights.

    Args:
        max_shard_size: as for the ``safetensors`` format.
    """

    name: ClassVar[str] = "adapter"

    def save_model(
        self, directory: Path, model: nn.Module, state: Mapping[str, torch.Tensor]
    ) -> list[str]:
        frozen = _frozen_names(model)
        return self._weights.save_tensors(
            directory, "model", {k: v for k, v in state.items() if k not in frozen}
        )

    def load_model(self, directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
        """The stored tensors, completed with ``model``'s own frozen parameters.

        Raises:
            treadle.CheckpointError: the stored names or shapes are not those ``model``
                would store (another adapter, or a model without it).
        """
        stored = self._weights.load_tensors(directory, "model")
        current = model.state_dict()
        frozen = _frozen_names(model)
        expected = {k: v for k, v in current.items() if k not in frozen}
        missing, unexpected = expected.keys() - stored.keys(), stored.keys() - expected.keys()
        shapes = sorted(
            k for k in stored.keys() & expected.keys() if stored[k].shape != expected[k].shape
        )
        if missing or unexpected or shapes:
            raise treadle.CheckpointError(
                f"the adapter checkpoint {directory} does not fit this model: missing "
                f"{sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}, shapes differ "
                f"for {shapes[:10]}. Apply the same adapter first (plugin 'lora' or "
                "treadle_hf.lora.apply), or export it with treadle_hf.lora.export_adapter"
            )
        return {**current, **stored}


# ------------------------------------------------------------------ helpers


def _frozen_names(model: nn.Module) -> set[str]:
    # remove_duplicate=False: a frozen tied weight (lm_head = wte) is frozen under both names.
    return {
        name
        for name, param in model.named_parameters(remove_duplicate=False)
        if not param.requires_grad
    }


def _peft() -> Any:
    from treadle.errors import require

    return require("peft", extra="peft", what="the 'lora' plugin", distribution="treadle-hf")
