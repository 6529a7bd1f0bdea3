"""``fsdp``: a model built on the meta device (``model_init_context``) is sharded, each rank's
shards materialised and initialised: ranks agree, and the weights equal the normal build's.

The two-process workers live in this module (the processes import it by name); one
``run_distributed`` call runs every scenario, and the tests below read its results.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

import treadle
from treadle import ConfigError, testing
from treadle.plugins.strategies.fsdp import FSDPStrategy, reset_parameters
from treadle.testing import TinyModel, tiny_data

CPU_FSDP = functools.partial(FSDPStrategy, device="cpu")
STEPS = 3


class Gain(nn.Module):
    """A parameter and a non-persistent buffer, and no ``reset_parameters``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(width))
        self.register_buffer("offset", torch.arange(width, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain + 0.01 * self.offset


class GainModel(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.gain = Gain(16)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        prediction = self.head(self.gain(self.blocks(self.embed(x)))).squeeze(-1)
        return {"loss": nn.functional.mse_loss(prediction, y)}


def init_gain(module: nn.Module) -> None:
    """``init_weights`` for GainModel: Gain by hand, every other module as torch.nn does."""
    if isinstance(module, Gain):
        nn.init.constant_(module.gain, 0.5)
        module.offset.copy_(torch.arange(module.offset.numel(), dtype=torch.float32))
    else:
        reset_parameters(module)


# ------------------------------------------------------------------ the two-process workers


def _devices(model: nn.Module) -> list[str]:
    return sorted({t.device.type for t in [*model.parameters(), *model.buffers()]})


def _train(
    model: nn.Module, strategy: FSDPStrategy, output_dir: str, load: str | None = None
) -> dict[str, Any]:
    """Set up, optionally load full weights from a file, fit; what the tests look at."""
    losses: list[float] = []

    class Losses:
        @treadle.hookimpl
        def on_step_end(self, loss: torch.Tensor) -> None:
            losses.append(float(loss))

    before = _devices(model)
    run = treadle.Run(
        model,
        train_data=DataLoader(tiny_data(), batch_size=4, shuffle=True),
        config=treadle.Config(max_steps=STEPS, output_dir=output_dir, save_at_end=False),
        strategy=strategy,
        optimizer={"name": "adamw", "lr": 1e-2},
        plugins=[Losses()],
        loggers=[],
    )
    with run:
        run.setup()
        after = _devices(model)
        unset = all(
            bool(torch.isnan(p.to_local()).all())
            for p in model.parameters()
            if p.to_local().numel()
        )
        if load is not None:  # every rank reads the whole file and keeps its own shards
            run.strategy.load_model_state_dict(run.wrapped_model, load_file(load))
        local = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        initial = dict(run.strategy.model_state_dict(run.wrapped_model))
        run.fit()
        final = dict(run.strategy.model_state_dict(run.wrapped_model))
    return {
        "before": before,
        "after": after,
        "unset": unset,
        "local": local,
        "buffers": buffers,
        "initial": initial,
        "final": final,
        "losses": losses,
    }


def scenarios(output_dir: str, weights_file: str) -> dict[str, Any]:
    """Every scenario, in one pair of processes (each run reuses the harness's group)."""
    results = {}

    treadle.seed_everything(0)
    results["normal"] = _train(TinyModel(), CPU_FSDP(), f"{output_dir}/normal")

    strategy = CPU_FSDP()
    with strategy.model_init_context():
        model = TinyModel()
    results["meta"] = _train(model, strategy, f"{output_dir}/meta")

    strategy = CPU_FSDP(init_weights="none")
    with strategy.model_init_context():
        model = TinyModel()
    results["load"] = _train(model, strategy, f"{output_dir}/load", load=weights_file)

    strategy = CPU_FSDP(init_weights=f"{__name__}:init_gain")
    with strategy.model_init_context():
        model = GainModel()
    results["custom"] = _train(model, strategy, f"{output_dir}/custom")

    # partly on meta: a head built normally keeps its values through to_empty
    strategy = CPU_FSDP()
    with strategy.model_init_context():
        model = TinyModel()
    torch.manual_seed(5)
    model.head = nn.Linear(16, 1)
    results["head"] = {k: v.clone() for k, v in model.head.state_dict().items()}
    results["partial"] = _train(model, strategy, f"{output_dir}/partial")
    return results


# ------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("fsdp-meta")
    treadle.seed_everything(0)
    save_file(TinyModel().state_dict(), root / "initial.safetensors")
    return testing.run_distributed(
        scenarios, str(root / "runs"), str(root / "initial.safetensors"), world_size=2, timeout=240
    )


def _assert_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.mark.multiprocess
def test_parameters_are_on_meta_before_wrapping_and_nowhere_after(ranks: list[dict]) -> None:
    for rank in ranks:
        for scenario in ("meta", "load", "custom"):
            assert rank[scenario]["before"] == ["meta"], scenario
            assert rank[scenario]["after"] == ["cpu"], scenario
        assert rank["partial"]["before"] == ["cpu", "meta"]
        assert rank["partial"]["after"] == ["cpu"]
        assert rank["normal"]["before"] == ["cpu"]


def _chunk(full: torch.Tensor, rank: int, world_size: int = 2) -> torch.Tensor:
    """Rank ``rank``'s dim-0 chunk, as FSDP shards (empty past the last one: (1, 16) on 2)."""
    chunks = torch.chunk(full, world_size)
    return chunks[rank] if rank < len(chunks) else full[:0]


@pytest.mark.multiprocess
def test_meta_init_gives_each_rank_its_slice_of_the_normal_build(ranks: list[dict]) -> None:
    """Same seed, so the same numbers as the model built normally: bit for bit on CPU."""
    normal = ranks[0]["normal"]["initial"]
    _assert_equal(ranks[0]["meta"]["initial"], normal)
    for index, rank in enumerate(ranks):
        assert not rank["meta"]["unset"]
        for name, local in rank["meta"]["local"].items():
            # rank r holds the r-th dim-0 chunk of the full tensor, as FSDP shards it
            assert torch.equal(local, _chunk(normal[name], index)), (index, name)
        # the ranks hold different rows: the parameters really are sharded
        assert rank["meta"]["local"]["embed.weight"].shape == (8, 8)


@pytest.mark.multiprocess
def test_a_meta_built_run_trains_exactly_as_the_normal_one(ranks: list[dict]) -> None:
    meta, normal = ranks[0]["meta"], ranks[0]["normal"]
    assert len(meta["losses"]) == STEPS
    assert all(torch.isfinite(torch.tensor(loss)) for loss in meta["losses"])
    for name in meta["initial"]:
        assert not torch.equal(meta["final"][name], meta["initial"][name]), name
    # tolerance: none; same initial weights, data order and random stream, on CPU
    _assert_equal(meta["final"], normal["final"])
    assert [r["meta"]["losses"] for r in ranks] == [r["normal"]["losses"] for r in ranks]


@pytest.mark.multiprocess
def test_weights_loaded_from_a_file_after_meta_init(ranks: list[dict]) -> None:
    """``init_weights="none"``: NaN until loaded; loaded, the run is the normal one."""
    for rank in ranks:
        assert rank["load"]["unset"]  # every parameter was NaN before the load
    # the file holds TinyModel() built after seed 0, as the normal run's model was
    _assert_equal(ranks[0]["load"]["initial"], ranks[0]["normal"]["initial"])
    _assert_equal(ranks[0]["load"]["final"], ranks[0]["normal"]["final"])


@pytest.mark.multiprocess
def test_init_weights_function_by_import_path(ranks: list[dict]) -> None:
    for index, rank in enumerate(ranks):
        custom = rank["custom"]
        assert torch.equal(custom["local"]["gain.gain"], torch.full((8,), 0.5)), index
        # the non-persistent buffer is not sharded: every rank holds all of it
        assert torch.equal(custom["buffers"]["gain.offset"], torch.arange(16.0)), index
        assert all(torch.isfinite(torch.tensor(loss)) for loss in custom["losses"])
    # the other modules got reset_parameters() under the seed: the normal build's numbers
    for name, tensor in ranks[0]["normal"]["initial"].items():
        assert torch.equal(ranks[0]["custom"]["initial"][name], tensor), name


@pytest.mark.multiprocess
def test_a_partly_meta_model_keeps_its_real_tensors(ranks: list[dict]) -> None:
    partial = ranks[0]["partial"]
    head = ranks[0]["head"]
    assert torch.equal(partial["initial"]["head.weight"], head["weight"])
    assert torch.equal(partial["initial"]["head.bias"], head["bias"])
    assert torch.equal(
        partial["initial"]["embed.weight"], ranks[0]["normal"]["initial"]["embed.weight"]
    )


# ------------------------------------------------------------------ checked before any compute


def _compose(model: nn.Module, strategy: FSDPStrategy) -> treadle.Run:
    return treadle.Run(
        model,
        train_data=DataLoader(tiny_data(), batch_size=4),
        config=treadle.Config(max_steps=1, output_dir="runs/unused", save_at_end=False),
        strategy=strategy,
        loggers=[],
    )


def test_model_init_context_builds_on_meta() -> None:
    with CPU_FSDP().model_init_context():
        model = TinyModel()
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert torch.empty(1).device.type == "cpu"  # the context is left


def test_a_module_without_reset_parameters_is_refused_when_composed() -> None:
    strategy = CPU_FSDP()
    with strategy.model_init_context():
        model = GainModel()
    with pytest.raises(ConfigError) as caught:
        _compose(model, strategy)
    message = str(caught.value)
    assert "no reset_parameters()" in message
    assert "gain (Gain: gain, offset)" in message
    assert "init_weights=f" in message and "init_weights='none'" in message
    # the same model is accepted with a function that initialises Gain
    _compose(model, CPU_FSDP(init_weights=init_gain))


def test_none_refuses_a_non_persistent_meta_buffer() -> None:
    strategy = CPU_FSDP(init_weights="none")
    with strategy.model_init_context():
        model = GainModel()
    with pytest.raises(ConfigError, match=r"non-persistent .*: gain\.offset"):
        _compose(model, strategy)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"init_weights": "zeros"}, "init_weights='zeros' is not allowed"),
        ({"init_weights": 3}, "init_weights=3 is not allowed"),
        ({"init_weights": "no_such_module_xyz:f"}, "cannot import 'no_such_module_xyz'"),
        ({"init_seed": -1}, "init_seed=-1 must be a non-negative integer"),
        ({"init_seed": True}, "init_seed=True must be a non-negative integer"),
    ],
)
def test_init_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CPU_FSDP(**options)


def test_a_normally_built_model_needs_no_initialiser() -> None:
    """init_weights is only for meta models: a real GainModel composes with the default."""
    _compose(GainModel(), CPU_FSDP())
