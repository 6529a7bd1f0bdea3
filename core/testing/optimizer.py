"""The optimizer conformance suite: ``class TestMine(OptimizerConformance): optimizer = mine``.

An optimizer plugin is a factory ``factory(model, **options) -> torch.optim.Optimizer``. The
suite checks that it covers each trainable parameter exactly once, that a step changes the
weights, that its state dict loads into a new optimizer which then steps identically, and that
a run with it trains and resumes bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from treadle.testing._fit import check_resume_exact, required
from treadle.testing.models import TinyModel, tiny_data

__all__ = ["OptimizerConformance", "resolve_factory"]


def resolve_factory(kind: str, spec: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``(factory, options)`` from a factory, an entry-point name or a mapping."""
    from treadle import registry

    if isinstance(spec, str):
        return registry.load(kind, spec), {}
    if isinstance(spec, Mapping):
        options = {k: v for k, v in spec.items() if k != "name"}
        return registry.load(kind, spec["name"]), options
    return spec, {}


def _loss(model: nn.Module, seed: int = 0) -> torch.Tensor:
    data = tiny_data(8, seed=seed)
    rows = [data[i] for i in range(8)]
    loss: torch.Tensor = model(**{k: torch.stack([r[k] for r in rows]) for k in rows[0]})["loss"]
    return loss


class OptimizerConformance:
    """Subclass it in a test module; pytest collects every ``test_`` method.

    Class attributes:
        optimizer: the factory (a function ``factory(model, **options)``), an entry-point
            name, or a ``{"name": ..., **options}`` mapping.
        options: options passed to the factory in every check (``{}``).
    """

    optimizer: ClassVar[Any] = None
    options: ClassVar[dict[str, Any]] = {}

    def _build(self, model: nn.Module) -> torch.optim.Optimizer:
        factory, options = resolve_factory("optimizer", required(self, "optimizer"))
        optimizer = factory(model, **{**options, **self.options})
        assert isinstance(optimizer, torch.optim.Optimizer), (
            f"the factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer"
        )
        return optimizer

    def test_covers_each_trainable_parameter_once(self) -> None:
        torch.manual_seed(0)
        model = TinyModel()
        model.embed.requires_grad_(False)  # frozen parameters may be left out
        optimizer = self._build(model)
        grouped = [p for group in optimizer.param_groups for p in group["params"]]
        assert len({id(p) for p in grouped}) == len(grouped), "a parameter is in two groups"
        known = {id(p) for p in model.parameters()}
        assert all(id(p) in known for p in grouped), "a group holds a tensor not of the model"
        missing = [
            name
            for name, p in model.named_parameters()
            if p.requires_grad and id(p) not in {id(q) for q in grouped}
        ]
        assert not missing, f"trainable parameters not optimised: {missing}"

    def test_a_step_changes_the_weights(self) -> None:
        torch.manual_seed(0)
        model = TinyModel()
        before = copy.deepcopy(model.state_dict())
        optimizer = self._build(model)
        torch.autograd.backward(_loss(model))
        optimizer.step()
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

    def test_state_dict_loads_into_a_new_optimizer(self) -> None:
        torch.manual_seed(0)
        model = TinyModel()
        optimizer = self._build(model)
        for seed in range(2):
            optimizer.zero_grad()
            torch.autograd.backward(_loss(model, seed))
            optimizer.step()
        twin = copy.deepcopy(model)
        twin_optimizer = self._build(twin)
        twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for m, o in ((model, optimizer), (twin, twin_optimizer)):
            o.zero_grad()
            torch.autograd.backward(_loss(m, 5))
            o.step()
        for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
            assert torch.equal(a, b), f"{name}: the reloaded optimizer stepped differently"

    def test_resumes_bit_for_bit(self) -> None:
        factory, options = resolve_factory("optimizer", required(self, "optimizer"))
        options = {**options, **self.options}
        check_resume_exact(lambda: {"optimizer": lambda model: factory(model, **options)})
