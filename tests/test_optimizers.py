"""The optimizer factories: one per torch.optim class, HF-style weight-decay groups, errors."""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest
import torch
from torch import nn

from treadle.errors import ConfigError
from treadle.plugins import optimizers
from treadle.plugins.optimizers import param_groups

OPTIMIZER_CLASSES = sorted(
    (
        cls
        for cls in vars(torch.optim).values()
        if inspect.isclass(cls)
        and issubclass(cls, torch.optim.Optimizer)
        and cls is not torch.optim.Optimizer
    ),
    key=lambda cls: cls.__name__,
)


class T5LayerNorm(nn.Module):
    """A third-party norm that does not subclass a torch norm (as in HF T5)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Tiny(nn.Module):
    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.t5ln = T5LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.t5ln(self.ln(self.proj(self.emb(x)))))


def _ids(params: list[torch.Tensor]) -> set[int]:
    return {id(p) for p in params}


def _group_ids(optimizer: torch.optim.Optimizer) -> list[set[int]]:
    return [_ids(g["params"]) for g in optimizer.param_groups]


def test_every_torch_optimizer_has_a_factory() -> None:
    assert len(OPTIMIZER_CLASSES) >= 14
    for cls in OPTIMIZER_CLASSES:
        factory = getattr(optimizers, cls.__name__.lower(), None)
        assert callable(factory), f"no factory for torch.optim.{cls.__name__}"
        assert factory.__name__ == cls.__name__.lower()
        # Muon only takes 2-D parameters.
        model = nn.Linear(3, 2, bias=False) if cls.__name__ == "Muon" else nn.Linear(3, 2)
        assert type(factory(model, lr=0.01)) is cls


def test_every_factory_is_an_entry_point() -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="treadle.optimizer")}
    for cls in OPTIMIZER_CLASSES:
        name = cls.__name__.lower()
        assert name in eps, f"{name} is not declared in the treadle.optimizer group"
        assert eps[name].load() is getattr(optimizers, name)


def test_weight_decay_excludes_biases_and_norm_weights() -> None:
    model = Tiny()
    opt = optimizers.adamw(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    assert _ids(decay["params"]) == _ids([model.emb.weight, model.proj.weight, model.head.weight])
    assert _ids(no_decay["params"]) == _ids(
        [model.proj.bias, model.ln.weight, model.ln.bias, model.t5ln.weight]
    )


def test_default_weight_decay_is_the_torch_default() -> None:
    decay, no_decay = optimizers.adamw(Tiny(), lr=1e-3).param_groups
    assert decay["weight_decay"] == 0.01  # torch.optim.AdamW's default
    assert no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("norm", [nn.BatchNorm1d(4), nn.GroupNorm(2, 4), nn.RMSNorm(4)])
def test_torch_norm_layers_are_not_decayed(norm: nn.Module) -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), norm)
    groups = param_groups(model, 0.1)
    assert _ids(groups[0]["params"]) == {id(model[0].weight)}
    assert _ids(groups[1]["params"]) == _ids(list(norm.parameters()))


def test_no_decay_substrings() -> None:
    model = Tiny()
    groups = param_groups(model, 0.1, no_decay=["emb"])
    assert id(model.emb.weight) in _ids(groups[1]["params"])
    assert id(model.emb.weight) not in _ids(groups[0]["params"])
    opt = optimizers.sgd(model, lr=0.1, weight_decay=0.1, no_decay=["proj.weight"])
    assert id(model.proj.weight) in _group_ids(opt)[1]


def test_frozen_parameters_are_left_out() -> None:
    model = Tiny()
    model.emb.weight.requires_grad_(False)
    opt = optimizers.adam(model, lr=1e-3, weight_decay=0.1)
    every = set().union(*_group_ids(opt))
    assert id(model.emb.weight) not in every
    assert len(every) == sum(1 for p in model.parameters() if p.requires_grad)


def test_tied_parameters_appear_once() -> None:
    model = Tiny(tie=True)
    opt = optimizers.adamw(model, lr=1e-3, weight_decay=0.1)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len(_ids(params))
    assert sum(p is model.emb.weight for p in params) == 1
    # The tied model trains: torch would raise on a parameter listed twice.
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()


def test_empty_group_dropped_and_no_trainable_parameters() -> None:
    groups = param_groups(nn.Linear(2, 2, bias=False), 0.1)
    assert len(groups) == 1
    model = nn.Linear(2, 2)
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        optimizers.adamw(model)


def test_unknown_option_names_optimizer_option_and_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        optimizers.adamw(Tiny(), lr=1e-3, beta=(0.9, 0.99))
    message = str(info.value)
    assert "'adamw'" in message
    assert "'beta'" in message
    assert "betas" in message and "amsgrad" in message and "no_decay" in message


def test_invalid_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'sgd'"):
        optimizers.sgd(Tiny(), lr=-1.0)


def test_options_are_passed_and_lists_become_tuples() -> None:
    opt = optimizers.adam(Tiny(), lr=0.5, betas=[0.8, 0.9], amsgrad=True)
    group = opt.param_groups[0]
    assert group["lr"] == 0.5
    assert group["betas"] == (0.8, 0.9)
    assert group["amsgrad"] is True


@pytest.mark.parametrize("name", ["lbfgs", "rprop", "sparseadam"])
def test_optimizers_without_weight_decay(name: str) -> None:
    factory = getattr(optimizers, name)
    opt = factory(Tiny(), weight_decay=0.0)
    assert len(opt.param_groups) == 1  # LBFGS refuses several groups
    with pytest.raises(ConfigError, match="weight_decay"):
        factory(Tiny(), weight_decay=0.1)


def test_lbfgs_steps() -> None:
    model = nn.Linear(2, 1)
    opt = optimizers.lbfgs(model, lr=0.1)
    x = torch.randn(4, 2)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)


def test_muon_takes_2d_weights_and_refuses_others() -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False))
    opt = optimizers.muon(model, lr=0.02)
    assert isinstance(opt, torch.optim.Muon)
    assert opt.param_groups[0]["weight_decay"] == 0.1  # Muon's own default
    model(torch.randn(3, 4)).sum().backward()
    opt.step()

    with pytest.raises(ConfigError) as info:
        optimizers.muon(Tiny(), lr=0.02)
    message = str(info.value)
    assert "muon" in message and "2-D" in message
    assert "proj.bias" in message and "ln.weight" in message
    assert "AdamW" in message


def test_factories_step_a_model() -> None:
    torch.manual_seed(0)
    model = Tiny()
    before = model.proj.weight.detach().clone()
    opt = optimizers.adamw(model, lr=0.1, weight_decay=0.1)
    model(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    assert not torch.equal(before, model.proj.weight)
