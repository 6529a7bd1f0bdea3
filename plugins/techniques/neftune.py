"""``neftune``: uniform noise on the input embeddings while training (NEFTune).

NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning") adds
``uniform(-1, 1) * alpha / sqrt(L * d)`` to every element of the input embeddings, where ``L``
is the sequence length (padded, as the embedding sees it) and ``d`` the embedding width: the
arithmetic of transformers' ``neftune_post_forward_hook``. The noise is drawn from torch's
global generator on the embeddings' device, so a seeded run is reproducible.

How it works: at the start of each ``fit`` the plugin registers a forward hook on the input
embedding module; the hook adds noise only while that module is in training mode, so
evaluation and prediction (``model.eval()``) see the clean embeddings. The hook is removed
when the fit ends, normally (``on_fit_end``) or by an exception (``on_exception``): after
``fit`` the model is the plain model again. Its cost is one ``rand_like`` per forward; there is
no host-device synchronisation.

The embedding module is ``model.get_input_embeddings()`` (Hugging Face models, PEFT models)
unless ``module`` names one: a dotted name from ``model.named_modules()``, e.g.
``"transformer.wte"``. Its output must be at least two-dimensional (``[..., L, d]``). Both are
checked when the run is composed.

Options:

* ``alpha`` (float, default ``5.0``): the noise scale; the paper uses 5, 10 or 15.
* ``module`` (str or None, default ``None``): the embedding module's dotted name; ``None``
  means ``model.get_input_embeddings()``.

Equivalents: HF ``TrainingArguments(neftune_noise_alpha=5.0)``; TRL's ``SFTConfig`` likewise.
Lightning has none built in.

Example::

    run = treadle.Run(model=lm, train_data=loader, plugins=[{"name": "neftune", "alpha": 5.0}])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from treadle.errors import ConfigError, TreadleError
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["NEFTune", "neftune_noise"]


def neftune_noise(embeddings: torch.Tensor, alpha: float) -> torch.Tensor:
    """``embeddings`` plus ``uniform(-1, 1) * alpha / sqrt(L * d)`` element-wise."""
    length, width = embeddings.shape[-2], embeddings.shape[-1]
    bound = alpha / math.sqrt(length * width)
    return embeddings + torch.empty_like(embeddings).uniform_(-bound, bound)


class NEFTune:
    """Add NEFTune noise to the input embeddings during training.

    Args:
        alpha: the noise scale (> 0).
        module: the dotted name of the embedding module, or None for
            ``model.get_input_embeddings()``.
    """

    name: ClassVar[str] = "neftune"

    def __init__(self, alpha: float = 5.0, module: str | None = None) -> None:
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, int | float)
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ConfigError(
                f"neftune option alpha = {alpha!r} is not allowed: expected a finite number > 0 "
                "(the paper uses 5, 10 or 15)"
            )
        if module is not None and (not isinstance(module, str) or not module):
            raise ConfigError(
                f"neftune option module = {module!r} is not allowed: expected a dotted module "
                "name such as 'transformer.wte', or None for model.get_input_embeddings()"
            )
        self.alpha = float(alpha)
        self.module = module
        self._handle: RemovableHandle | None = None

    def __repr__(self) -> str:
        return f"NEFTune(alpha={self.alpha}, module={self.module!r})"

    @property
    def active(self) -> bool:
        """Whether the noise hook is registered (between a fit's start and its end)."""
        return self._handle is not None

    def embedding_module(self, model: nn.Module) -> nn.Module:
        """The module whose output gets the noise."""
        if self.module is not None:
            modules: dict[str, nn.Module] = dict(model.named_modules())
            if self.module not in modules:
                embeddings = [n for n, m in modules.items() if isinstance(m, nn.Embedding)]
                raise ConfigError(
                    f"neftune option module = {self.module!r}: {type(model).__name__} has no "
                    f"such submodule; its nn.Embedding modules are: "
                    f"{', '.join(embeddings) or 'none'}"
                )
            return modules[self.module]
        get = getattr(model, "get_input_embeddings", None)
        found = get() if callable(get) else None
        if not isinstance(found, nn.Module):
            embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
            raise ConfigError(
                f"neftune: {type(model).__name__} has no get_input_embeddings() returning a "
                "module; name the embedding module with the option module=..., e.g. one of: "
                f"{', '.join(embeddings) or '(no nn.Embedding found)'}"
            )
        return found

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_init_end(self, run: Run) -> None:
        self.embedding_module(run.model)  # a wrong name is an error before any compute

    @hookimpl
    def on_fit_begin(self, run: Run) -> None:
        self._remove()
        module = self.embedding_module(run.model)
        self._handle = module.register_forward_hook(self._add_noise)

    @hookimpl
    def on_fit_end(self) -> None:
        self._remove()

    @hookimpl
    def on_exception(self) -> None:
        self._remove()

    # ------------------------------------------------------------------ the hook

    def _add_noise(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if not module.training:
            return output
        if not isinstance(output, torch.Tensor) or output.dim() < 2:
            raise TreadleError(
                f"neftune: the embedding module {type(module).__name__} returned "
                f"{type(output).__name__} {tuple(getattr(output, 'shape', ()))}; NEFTune needs a "
                "tensor [..., length, width]. Name the token-embedding module with module=..."
            )
        return neftune_noise(output, self.alpha)

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
