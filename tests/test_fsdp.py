"""``fsdp`` (FSDP2) and the ``dcp`` checkpoint format: conformance on two gloo processes,
wrap policies, the full-weights export, and the safety of reading dcp metadata."""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path

import dist_workers
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from treadle import ConfigError, TreadleError, checkpoint, load_weights, registry, testing
from treadle.plugins.checkpoint.dcp_format import DCPFormat
from treadle.plugins.export import export
from treadle.plugins.strategies.fsdp import FSDPStrategy

CPU_FSDP = functools.partial(FSDPStrategy, device="cpu")


@pytest.mark.multiprocess
class TestFSDPConformance(testing.StrategyConformance):
    """Sharded checkpoints: every rank writes its own shards."""

    strategy = CPU_FSDP
    checkpoint = DCPFormat


@pytest.mark.multiprocess
def test_roundtrip_through_a_whole_file_format() -> None:
    """With a non-sharded format the full state is gathered to rank 0 and read back by all."""
    result = testing.check_checkpoint_roundtrip(CPU_FSDP, checkpoint="safetensors")
    assert result["max_abs_diff"] == 0.0


@pytest.mark.multiprocess
def test_dcp_checkpoint_exports_to_a_plain_model(tmp_path: Path) -> None:
    (result, _) = testing.run_distributed(
        dist_workers.fsdp_dcp_checkpoint, str(tmp_path / "run"), world_size=2
    )
    # the parameters really were sharded: each rank held half of the rows
    assert result["local_shapes"]["embed.weight"] == (8, 8)
    path = Path(result["checkpoint"])
    assert sorted(os.listdir(path / "model")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not checkpoint.verify(path)

    full = DCPFormat().load_tensors(path, "model")  # one process, no group: whole tensors
    save_file(full, tmp_path / "model.safetensors")
    plain = testing.TinyModel()
    plain.load_state_dict(load_file(tmp_path / "model.safetensors"))
    for name, tensor in result["weights"].items():
        assert torch.equal(plain.state_dict()[name], tensor), name

    if "dcp" in registry.entries("checkpoint"):  # the export, once dcp is declared
        out = export(path, tmp_path / "export")
        again = testing.TinyModel()
        load_weights(again, out)
        for name, tensor in result["weights"].items():
            assert torch.equal(again.state_dict()[name], tensor), name


# ------------------------------------------------------------------ wrap policies and options


def _unit_types(strategy: FSDPStrategy, model: nn.Module) -> list[str]:
    return [type(unit).__name__ for unit in strategy._units(model)]


def test_units_default_to_the_models_no_split_modules() -> None:
    assert _unit_types(CPU_FSDP(), testing.TinyModel()) == ["TinyBlock", "TinyBlock"]


def test_units_by_class_name_innermost_first() -> None:
    model = testing.TinyModel()
    units = CPU_FSDP(wrap=["TinyBlock", "Linear"])._units(model)
    names = {id(module): name for name, module in model.named_modules()}
    order = [names[id(unit)] for unit in units]
    assert order.index("blocks.0.linear") < order.index("blocks.0")
    assert set(order) == {
        "embed", "head", "blocks.0", "blocks.1", "blocks.0.linear", "blocks.1.linear"
    }  # fmt: skip


def test_units_by_size() -> None:
    model = testing.TinyModel()  # each TinyBlock: 16*16+16 = 272 parameters
    assert _unit_types(CPU_FSDP(min_num_params=200), model) == ["Linear", "Linear"]
    assert _unit_types(CPU_FSDP(min_num_params=500), model) == ["Sequential"]


def test_unknown_wrap_class_names_the_ones_there_are() -> None:
    with pytest.raises(ConfigError, match="TinyBlock"):
        CPU_FSDP(wrap=["Block"])._units(testing.TinyModel())


def test_options_are_checked_when_composed() -> None:
    with pytest.raises(ConfigError, match="not both"):
        CPU_FSDP(wrap=["TinyBlock"], min_num_params=10)
    with pytest.raises(ConfigError, match="param_dtype"):
        CPU_FSDP(param_dtype="bfloat17")
    with pytest.raises(ConfigError, match="reshard_after_forward"):
        CPU_FSDP(reshard_after_forward=0)
    strategy = CPU_FSDP(param_dtype="bf16", reduce_dtype="float32")
    assert strategy.param_dtype == torch.bfloat16 and strategy.reduce_dtype == torch.float32


def test_found_by_name() -> None:
    for kind, name, target in [
        ("strategy", "fsdp", FSDPStrategy),
        ("checkpoint", "dcp", DCPFormat),
    ]:
        if name not in registry.entries(kind):
            pytest.skip(f"the {name!r} entry point is not declared in pyproject.toml yet")
        assert registry.load(kind, name) is target


# ------------------------------------------------------------------ dcp in one process


def test_dcp_round_trip_in_one_process(tmp_path: Path) -> None:
    fmt = DCPFormat()
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5),
        "c": torch.zeros(2, dtype=torch.bfloat16),
    }
    files = fmt.save_tensors(tmp_path, "optimizer", tensors)
    assert "optimizer/.metadata" in files
    loaded = fmt.load_tensors(tmp_path, "optimizer")
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor) and loaded[key].dtype == tensor.dtype


def test_dcp_load_model_checks_names_and_shapes_first(tmp_path: Path) -> None:
    fmt = DCPFormat()
    fmt.save_model(tmp_path, nn.Linear(3, 2), {"weight": torch.ones(2, 3), "bias": torch.ones(2)})
    assert torch.equal(fmt.load_model(tmp_path, nn.Linear(3, 2))["weight"], torch.ones(2, 3))
    with pytest.raises(TreadleError, match="Shape mismatches"):
        fmt.load_model(tmp_path, nn.Linear(4, 2))
    with pytest.raises(TreadleError, match="no dcp checkpoint"):
        fmt.load_tensors(tmp_path, "missing")


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo owned > /dev/null",))


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path: Path) -> None:
    DCPFormat().save_tensors(tmp_path, "model", {"w": torch.ones(2)})
    (tmp_path / "model" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(TreadleError, match="refusing to unpickle"):
        DCPFormat().load_tensors(tmp_path, "model")


def test_dcp_entries_that_are_not_tensors_are_refused(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning):
        dcp.save({"w": torch.ones(2), "extra": {"note": [1, 2]}}, checkpoint_id=tmp_path / "model")
    with pytest.raises(TreadleError, match="not a tensor"):
        DCPFormat().load_tensors(tmp_path, "model")


def test_thread_count_is_checked() -> None:
    with pytest.raises(ConfigError, match="thread_count"):
        DCPFormat(thread_count=0)
