"""``activation-checkpointing``: recompute chosen blocks' activations in backward, saving memory.

Activation (gradient) checkpointing keeps only the *inputs* of a checkpointed block during the
forward pass and runs the block's forward again during backward to get what its gradient
needs: peak activation memory falls from every layer's intermediates to roughly one block's,
for about one extra forward pass of compute. Losses and gradients are unchanged (the random
state is replayed, so dropout draws the same masks).

Two ways, chosen by ``modules``:

* ``modules`` given (class names, or classes, matched by class *name*): every submodule of the
  model whose class is one of them has its forward run under
  ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``. The plugin swaps each such
  submodule's class for a subclass of the same name whose ``forward`` does that, so the module
  tree, ``isinstance`` and the ``state_dict`` keys do not change: checkpoints of a run with and without the plugin load into each other. A
  submodule nested inside another matched one is not checkpointed twice. Under
  ``torch.no_grad()`` (evaluation, prediction) the forward runs plainly.
* ``modules`` not given: the model's own method, which checkpoints each transformer layer:
  ``activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})``
  (transformers >= 5.x, where ``gradient_checkpointing_enable`` is a deprecated alias), else
  ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``
  (older transformers, PEFT models, other libraries that copied the name).

When: at the end of ``Run(...)`` (``on_init_end``), so before the strategy wraps or shards the
model (the order torch recommends for FSDP); a plugin added later with ``run.add_plugin``
applies at its first ``fit``. It is applied once per ``Run``; the model stays checkpointed
afterwards (a later ``fit`` does not apply it again).

Errors, when the run is composed: ``modules`` that match no submodule (the message lists the
model's classes), or no ``modules`` and no ``gradient_checkpointing_enable`` method.

Options:

* ``modules`` (list of str or ``nn.Module`` classes, default ``None``): the block classes to
  checkpoint, e.g. ``["GPT2Block"]`` or ``[MyBlock]``; ``None`` uses the model's own method.

Equivalents: HF ``TrainingArguments(gradient_checkpointing=True)``; Lightning: call
``torch.distributed.algorithms._checkpoint.checkpoint_wrapper.apply_activation_checkpointing``
or ``model.gradient_checkpointing_enable()`` yourself (FSDP strategy's
``activation_checkpointing_policy``).

Example::

    run = treadle.Run(model=model, train_data=loader,
                      plugins=[{"name": "activation-checkpointing", "modules": ["Block"]}])
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from treadle.errors import ConfigError
from treadle.hookspecs import hookimpl

if TYPE_CHECKING:
    from treadle.run import Run

__all__ = ["ActivationCheckpointing", "checkpoint_modules"]

#: Set on the checkpointing subclasses, so that a module is never wrapped twice.
_MARK = "__treadle_activation_checkpointing__"
#: A model's own switches (Hugging Face's names; the first is transformers 5's).
_OWN_METHODS = ("activation_checkpointing_enable", "gradient_checkpointing_enable")
_SUBCLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _checkpointing_subclass(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` with the same name whose forward runs under checkpoint.

    Swapping an instance's class (rather than setting a ``forward`` attribute) keeps the
    module picklable by reference to its state, correct under ``copy.deepcopy`` (a copied
    function attribute would still call the original module), and ``isinstance`` intact.
    """
    if getattr(cls, _MARK, False):
        return cls
    if cls not in _SUBCLASSES:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            plain = functools.partial(cls.forward, self)
            if not torch.is_grad_enabled():  # nothing is saved for backward: run it plainly
                return plain(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(plain, *args, use_reentrant=False, **kwargs)

        subclass = type(
            cls.__name__,
            (cls,),
            {"forward": forward, _MARK: True, "__module__": cls.__module__},
        )
        subclass.__qualname__ = cls.__qualname__
        _SUBCLASSES[cls] = subclass
    return _SUBCLASSES[cls]


def matching_modules(model: nn.Module, class_names: set[str]) -> list[nn.Module]:
    """The outermost submodules of ``model`` whose class name is in ``class_names``."""
    found: list[nn.Module] = []
    inside: set[str] = set()  # names of matched modules; their descendants are skipped
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in inside):
            continue
        if type(module).__name__ in class_names:
            found.append(module)
            inside.add(name)
    return found


def checkpoint_modules(model: nn.Module, class_names: set[str]) -> int:
    """Checkpoint every outermost submodule whose class name is in ``class_names``, in place;
    return how many were (newly) checkpointed."""
    count = 0
    for module in matching_modules(model, class_names):
        if getattr(type(module), _MARK, False):
            continue
        module.__class__ = _checkpointing_subclass(type(module))
        count += 1
    return count


class ActivationCheckpointing:
    """Recompute the activations of chosen submodules in backward instead of keeping them.

    Args:
        modules: class names (or classes) of the blocks to checkpoint; ``None`` calls the
            model's own ``gradient_checkpointing_enable``.
    """

    name: ClassVar[str] = "activation-checkpointing"

    def __init__(self, modules: Sequence[str | type[nn.Module]] | None = None) -> None:
        if modules is not None:
            if isinstance(modules, str | type) or not isinstance(modules, Sequence):
                modules = [modules]
            bad = [m for m in modules if not _is_class_spec(m)]
            if not modules or bad:
                raise ConfigError(
                    f"activation-checkpointing option modules = {modules!r} is not allowed: "
                    "expected a non-empty list of nn.Module class names or classes, e.g. "
                    "['GPT2Block'], or None for the model's gradient_checkpointing_enable()"
                )
        self.modules = modules
        self.class_names: set[str] | None = (
            None if modules is None else {m if isinstance(m, str) else m.__name__ for m in modules}
        )
        self.applied = False

    def __repr__(self) -> str:
        names = None if self.class_names is None else sorted(self.class_names)
        return f"ActivationCheckpointing(modules={names!r})"

    def check(self, model: nn.Module) -> None:
        """Raise ``ConfigError`` if the plugin cannot apply to ``model``."""
        if self.class_names is None:
            if not any(callable(getattr(model, name, None)) for name in _OWN_METHODS):
                raise ConfigError(
                    f"activation-checkpointing: {type(model).__name__} has no "
                    "activation_checkpointing_enable() or gradient_checkpointing_enable() "
                    "method; name the blocks to checkpoint with "
                    f"modules=[...], e.g. one of: {_classes_of(model)}"
                )
        elif not matching_modules(model, self.class_names):
            raise ConfigError(
                f"activation-checkpointing option modules = {sorted(self.class_names)}: no "
                f"submodule of {type(model).__name__} has one of these classes; its classes "
                f"are: {_classes_of(model)}"
            )

    def apply(self, model: nn.Module) -> None:
        """Checkpoint ``model`` in place (once)."""
        if self.applied:
            return
        self.check(model)
        if self.class_names is not None:
            checkpoint_modules(model, self.class_names)
        elif callable(getattr(model, "activation_checkpointing_enable", None)):
            model.activation_checkpointing_enable(  # type: ignore[operator]
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.gradient_checkpointing_enable(  # type: ignore[operator]
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.applied = True

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_init_end(self, run: Run) -> None:
        self.apply(run.model)  # before the strategy wraps or shards the model

    @hookimpl
    def on_fit_begin(self, run: Run) -> None:
        self.apply(run.model)  # added with run.add_plugin after the run was composed


def _is_class_spec(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, type) and issubclass(value, nn.Module)


def _classes_of(model: nn.Module) -> str:
    names = dict.fromkeys(type(m).__name__ for m in model.modules())
    return ", ".join(names)
