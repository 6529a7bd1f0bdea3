"""Optimizer factories: one per ``torch.optim`` optimizer, named by its lowercase class name.

Each factory is called as ``adamw(model, lr=3e-4, weight_decay=0.1, no_decay=["pos_emb"])``.
Options go to the torch class, except two that shape the parameter groups:

- ``weight_decay`` (default: the torch class's own default) decays every trainable parameter
  except biases and the weights of normalisation layers, which get ``0.0`` (as the HF Trainer
  does). An optimizer without weight decay (LBFGS, Rprop, SparseAdam) rejects a non-zero value.
- ``no_decay``: extra parameter-name substrings whose parameters are not decayed.

Frozen parameters (``requires_grad=False``) are left out; a parameter tied to several modules
appears once. Muon only updates 2-D matrices, so ``muon`` refuses a model with other trainable
parameters instead of failing at the first step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from treadle.errors import ConfigError

__all__ = [
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "asgd",
    "lbfgs",
    "muon",
    "nadam",
    "param_groups",
    "radam",
    "rmsprop",
    "rprop",
    "sgd",
    "sparseadam",
]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def _is_norm(module: nn.Module) -> bool:
    # The class-name test catches third-party norms (T5LayerNorm, LlamaRMSNorm) that do not
    # subclass a torch norm.
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def _trainable(model: nn.Module, no_decay: Iterable[str]) -> list[tuple[str, nn.Parameter, bool]]:
    """``(name, parameter, decays)`` for each distinct trainable parameter, in model order."""
    extra = tuple(no_decay)
    seen: set[int] = set()
    out: list[tuple[str, nn.Parameter, bool]] = []
    for module_name, module in model.named_modules():
        norm = _is_norm(module)
        for local, param in module.named_parameters(recurse=False):
            # Tied weights are one tensor reached from two modules: the first owner decides.
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            name = f"{module_name}.{local}" if module_name else local
            decays = not (norm or "bias" in local or any(s in name for s in extra))
            out.append((name, param, decays))
    return out


def param_groups(
    model: nn.Module, weight_decay: float, no_decay: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a decayed and a non-decayed group.

    Args:
        model: The model whose parameters to group.
        weight_decay: Weight decay of the decayed group.
        no_decay: Extra parameter-name substrings to exclude from weight decay, on top of
            biases and normalisation-layer weights.

    Returns:
        Up to two parameter groups (empty groups are dropped), the decayed one first, each
        with its own ``weight_decay``; ready to pass to a ``torch.optim`` optimizer.
    """
    if isinstance(no_decay, str):
        # A bare string would be split into characters and exclude nearly everything.
        no_decay = [no_decay]
    params = _trainable(model, no_decay)
    groups = [
        {"params": [p for _, p, d in params if d], "weight_decay": weight_decay},
        {"params": [p for _, p, d in params if not d], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _build(cls_name: str, model: nn.Module, options: dict[str, Any]) -> torch.optim.Optimizer:
    name = cls_name.lower()
    cls = getattr(torch.optim, cls_name, None)
    if cls is None:
        raise ConfigError(
            f"optimizer {name!r} needs torch.optim.{cls_name}, which torch {torch.__version__} "
            "does not have; upgrade torch or choose another optimizer."
        )
    signature = inspect.signature(cls.__init__).parameters
    allowed = sorted(set(signature) - {"self", "params"})
    options = dict(options)
    no_decay = options.pop("no_decay", ())
    # weight_decay is always understood: handled below, with its own message where unsupported.
    unknown = sorted(set(options) - set(allowed) - {"weight_decay"})
    if unknown:
        raise ConfigError(
            f"optimizer {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join([*allowed, 'no_decay'])}."
        )
    # TOML and JSON have no tuples; torch expects them for betas, eps pairs and the like.
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}

    if "weight_decay" in signature:
        default = signature["weight_decay"].default
        weight_decay = options.pop("weight_decay", default)
        groups = param_groups(model, weight_decay, no_decay)
    else:
        if options.pop("weight_decay", 0):
            raise ConfigError(
                f"optimizer {name!r} has no weight decay; drop the option 'weight_decay' or "
                "choose an optimizer that has it (adamw, sgd, ...)."
            )
        # One group: LBFGS refuses several, and without weight decay there is nothing to split.
        groups = [{"params": [p for _, p, _ in _trainable(model, ())]}]
        groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError(f"optimizer {name!r}: the model has no trainable parameters.")
    if cls_name == "Muon":
        others = [n for n, p, _ in _trainable(model, ()) if p.ndim != 2]
        if others:
            shown = ", ".join(others[:8]) + (", ..." if len(others) > 8 else "")
            raise ConfigError(
                f"optimizer 'muon' only updates 2-D weight matrices, but the model has "
                f"{len(others)} other trainable parameter(s): {shown}. Freeze them, or "
                "write a `make_optimizer` hook that gives 2-D weights to torch.optim.Muon and "
                "the rest (biases, norms, embeddings) to AdamW."
            )
    try:
        return cls(groups, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer {name!r}: invalid options {options!r}: {exc}") from exc


def _signature(cls_name: str) -> inspect.Signature | None:
    """``factory(model, /, *, <the torch class's options>, no_decay=())``."""
    cls = getattr(torch.optim, cls_name, None)
    if cls is None:
        return None
    options = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, params
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    model = inspect.Parameter("model", inspect.Parameter.POSITIONAL_ONLY, annotation="nn.Module")
    no_decay = inspect.Parameter(
        "no_decay", inspect.Parameter.KEYWORD_ONLY, default=(), annotation="Iterable[str]"
    )
    return inspect.Signature([model, *options, no_decay])


def _factory(cls_name: str) -> Callable[..., torch.optim.Optimizer]:
    def factory(model: nn.Module, /, **options: Any) -> torch.optim.Optimizer:
        return _build(cls_name, model, options)

    factory.__name__ = factory.__qualname__ = cls_name.lower()
    signature = _signature(cls_name)
    if signature is not None:  # what `treadle plugins --verbose` and the docs show
        factory.__signature__ = signature  # type: ignore[attr-defined]
    factory.__doc__ = (
        f"Build ``torch.optim.{cls_name}`` over ``model``'s trainable parameters.\n\n"
        "Args:\n"
        "    model: The model to optimize.\n"
        "    **options: Options of the torch class; ``weight_decay`` and ``no_decay`` shape\n"
        "        the parameter groups (see the module docstring).\n\n"
        "Returns:\n"
        f"    A ``torch.optim.{cls_name}``.\n\n"
        "Raises:\n"
        "    ConfigError: An option is unknown or invalid.\n"
    )
    return factory


adadelta = _factory("Adadelta")
adafactor = _factory("Adafactor")
adagrad = _factory("Adagrad")
adam = _factory("Adam")
adamax = _factory("Adamax")
adamw = _factory("AdamW")
asgd = _factory("ASGD")
lbfgs = _factory("LBFGS")
muon = _factory("Muon")
nadam = _factory("NAdam")
radam = _factory("RAdam")
rmsprop = _factory("RMSprop")
rprop = _factory("Rprop")
sgd = _factory("SGD")
sparseadam = _factory("SparseAdam")
