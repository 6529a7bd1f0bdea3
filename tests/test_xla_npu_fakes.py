"""The ``xla`` and ``npu`` strategies against fake ``torch_xla`` and ``torch_npu`` modules.

Neither library installs here (no release matches this torch; torch_npu would replace torch's
own libraries), so these tests check the calls each strategy makes, in order, on modules that
record them. The fake XLA device is the CPU, so a whole ``fit`` runs on it. The fake NPU
registers the ``npu`` device with torch, which cannot be undone, so it runs in subprocesses.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import treadle
from treadle import testing
from treadle.components import Precision
from treadle.errors import MissingDependencyError
from treadle.plugins.strategies.single import SingleDevice
from treadle.testing import TinyModel, tiny_data

# ---------------------------------------------------------------------- a fake torch_xla


class FakeXLA:
    """``torch_xla``, ``torch_xla.core.xla_model`` and ``torch_xla.runtime``, recording calls.

    The device is the CPU; ``world`` replicas are simulated as identical copies of this one.
    """

    REDUCE_SUM, REDUCE_MAX, REDUCE_MIN = "sum", "max", "min"

    def __init__(self, world: int = 1, ordinal: int = 0) -> None:
        self.world, self.ordinal = world, ordinal
        self.calls: list[Any] = []
        self.seed = 0

    # torch_xla
    def device(self) -> torch.device:
        self.calls.append("device")
        return torch.device("cpu")

    # torch_xla.core.xla_model
    def mark_step(self) -> None:
        self.calls.append("mark_step")
        self.seed += 1  # as if the graph just run had drawn random numbers

    def wait_device_ops(self) -> None:
        self.calls.append("wait_device_ops")

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        self.calls.append("reduce_gradients")

    def all_reduce(self, kind: str, tensor: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.calls.append(("all_reduce", kind, scale))
        return tensor * (self.world * scale if kind == "sum" else 1.0)

    def rendezvous(self, tag: str) -> None:
        self.calls.append(("rendezvous", tag))

    def mesh_reduce(self, tag: str, data: Any, reduce: Any) -> Any:
        self.calls.append(("mesh_reduce", tag))
        return reduce([data] * self.world)

    def get_rng_state(self, device: Any = None) -> int:
        self.calls.append("get_rng_state")
        return self.seed

    def set_rng_state(self, seed: int, device: Any = None) -> None:
        self.calls.append(("set_rng_state", seed))
        self.seed = seed

    def _maybe_convert_to_cpu(self, data: Any) -> Any:
        self.calls.append("to_cpu")
        return data

    # torch_xla.runtime
    def world_size(self) -> int:
        return self.world

    def global_ordinal(self) -> int:
        return self.ordinal

    def local_ordinal(self) -> int:
        return self.ordinal

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        package = types.ModuleType("torch_xla")
        core = types.ModuleType("torch_xla.core")
        xm = types.ModuleType("torch_xla.core.xla_model")
        xr = types.ModuleType("torch_xla.runtime")
        package.device = self.device  # type: ignore[attr-defined]
        for name in ("mark_step", "wait_device_ops", "reduce_gradients", "all_reduce",
                     "rendezvous", "mesh_reduce", "get_rng_state", "set_rng_state",
                     "_maybe_convert_to_cpu", "REDUCE_SUM", "REDUCE_MAX", "REDUCE_MIN"):  # fmt: skip
            setattr(xm, name, getattr(self, name))
        for name in ("world_size", "global_ordinal", "local_ordinal"):
            setattr(xr, name, getattr(self, name))
        package.core, core.xla_model, package.runtime = core, xm, xr  # type: ignore[attr-defined]
        for module in (package, core, xm, xr):
            module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
            monkeypatch.setitem(sys.modules, module.__name__, module)


@pytest.fixture
def fake_xla(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeXLA]:
    fake = FakeXLA()
    fake.install(monkeypatch)
    yield fake


class Markers:
    """Puts the loop's own events among the fake's calls."""

    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls

    @treadle.hookimpl
    def on_before_optimizer_step(self) -> None:
        self.calls.append("<before optimizer step>")

    @treadle.hookimpl
    def on_after_optimizer_step(self) -> None:
        self.calls.append("<after optimizer step>")

    @treadle.hookimpl
    def on_eval_step_end(self) -> None:
        self.calls.append("<eval step>")

    @treadle.hookimpl
    def on_log(self, metrics: dict[str, Any]) -> None:
        self.calls.append("<training log>" if "loss" in metrics else "<eval log>")

    @treadle.hookimpl
    def on_save_end(self) -> None:
        self.calls.append("<saved>")


def _run(strategy: Any, output_dir: Path, **config: Any) -> treadle.Run:
    torch.manual_seed(0)
    settings = {"max_steps": 3, "grad_accum_steps": 2, "log_every": 3, "seed": 0,
                "output_dir": str(output_dir), "eval_at_end": True, **config}  # fmt: skip
    return treadle.Run(
        TinyModel(),
        train_data=DataLoader(tiny_data(16), batch_size=4, shuffle=True),
        eval_data=DataLoader(tiny_data(8, seed=5), batch_size=4),
        config=treadle.Config(**settings),
        strategy=strategy,
        optimizer=lambda model: torch.optim.AdamW(model.parameters(), lr=0.02),
        loggers=[],
    )


def _between(calls: list[Any], start: str, end: str) -> list[list[Any]]:
    """The calls between each ``start`` marker and the next ``end`` marker."""
    spans, current = [], None
    for call in calls:
        if call == start:
            current = []
        elif call == end and current is not None:
            spans.append(current)
            current = None
        elif current is not None:
            current.append(call)
    return spans


def test_xla_fit_calls_torch_xla_in_order_and_trains_like_one_device(
    fake_xla: FakeXLA, tmp_path: Path
) -> None:
    from treadle.plugins.strategies.xla import XLAStrategy

    with _run(XLAStrategy(), tmp_path / "xla") as run:
        run.add_plugin(Markers(fake_xla.calls))
        run.fit()
        xla_weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    calls = fake_xla.calls
    assert calls[:2] == ["device", ("set_rng_state", 0)]  # the device, seeded, at set-up
    # every optimizer step is followed by mark_step, inside the step, before the loop goes on
    assert (
        _between(calls, "<before optimizer step>", "<after optimizer step>") == [["mark_step"]] * 3
    )
    # the loop's clock is read after the device finished: wait_device_ops right before the log
    assert calls[calls.index("<training log>") - 1] == "wait_device_ops"
    # one graph per evaluation batch
    evaluation = calls[calls.index("<eval step>") : calls.index("<eval log>")]
    assert evaluation == ["<eval step>", "mark_step"] * 2
    # saving: the random state of every replica, then (main process) the state on CPU
    saving = calls[calls.index("<eval log>") + 1 : calls.index("<saved>")]
    assert saving == ["get_rng_state", "to_cpu", "to_cpu"]  # model, then optimizer state

    with _run(SingleDevice(device="cpu"), tmp_path / "single") as run:
        run.fit()
        for name, tensor in run.model.state_dict().items():
            assert torch.equal(xla_weights[name], tensor), name  # the same loop, on the CPU


def test_xla_resume_restores_each_replicas_random_state(fake_xla: FakeXLA, tmp_path: Path) -> None:
    from treadle.plugins.strategies.xla import XLAStrategy

    with _run(XLAStrategy(), tmp_path, seed=7, eval_at_end=False) as run:
        run.fit()
    saved = fake_xla.seed  # seeded with 7 at set-up, advanced by every graph since
    assert saved != 7
    fake_xla.calls.clear()
    with _run(XLAStrategy(), tmp_path, seed=7, max_steps=4, resume="auto") as run:
        run.fit()
    restored = [c for c in fake_xla.calls if isinstance(c, tuple) and c[0] == "set_rng_state"]
    assert restored == [("set_rng_state", 7), ("set_rng_state", saved)]


def test_xla_collectives_with_several_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    from treadle.plugins.strategies.xla import XLAStrategy

    fake = FakeXLA(world=4, ordinal=3)
    fake.install(monkeypatch)
    strategy = XLAStrategy()
    strategy.precision = Precision()
    strategy.setup(None)  # type: ignore[arg-type]  (the run is not read)
    assert (strategy.rank, strategy.world_size, strategy.is_main_process) == (3, 4, False)
    fake.calls.clear()
    assert float(strategy.all_reduce(torch.tensor(2.0), "mean")) == 2.0
    assert float(strategy.all_reduce(torch.tensor(2.0), "sum")) == 8.0
    strategy.all_reduce(torch.tensor(2.0), "max")
    assert strategy.agree(0b01) == 0b01
    assert strategy.all_gather_object({"a": 1}) == [{"a": 1}] * 4
    strategy.barrier()
    assert fake.calls == [
        ("all_reduce", "sum", 0.25),
        ("all_reduce", "sum", 1.0),
        ("all_reduce", "max", 1.0),
        ("mesh_reduce", "treadle.agree"),
        ("mesh_reduce", "treadle.all_gather_object"),
        ("rendezvous", "treadle.barrier"),
    ]
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.ones(1, 2)).sum().backward()
    fake.calls.clear()
    strategy.finalize_gradients(optimizer, 2)
    assert fake.calls == ["reduce_gradients"]  # once per step, before the division
    assert torch.equal(model.bias.grad, torch.tensor([0.5]))
    # only the main process moves the state to CPU, as xm.save does
    assert strategy.model_state_dict(model) == {} and "to_cpu" not in fake.calls


def test_xla_without_torch_xla_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from treadle.plugins.strategies.xla import XLAStrategy

    monkeypatch.setitem(sys.modules, "torch_xla", None)  # an import of it fails
    with pytest.raises(MissingDependencyError, match="must match torch exactly"):
        XLAStrategy()


# ---------------------------------------------------------------------- a fake torch_npu


class _FakeNPUFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import torch_npu`` do what the real one does: register the ``npu`` device."""

    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torch_npu":
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        calls = self.calls
        calls.append("import torch_npu")
        npu = types.ModuleType("torch_npu.npu")

        def set_device(device: Any) -> None:
            calls.append(("torch.npu.set_device", str(device)))

        npu.is_available = lambda: True  # type: ignore[attr-defined]
        npu.device_count = lambda: 2  # type: ignore[attr-defined]
        npu.set_device = set_device  # type: ignore[attr-defined]
        npu.get_rng_state = lambda device=None: torch.zeros(8, dtype=torch.uint8)  # type: ignore[attr-defined]
        torch.utils.rename_privateuse1_backend("npu")
        torch._register_device_module("npu", npu)
        module.npu = npu  # type: ignore[attr-defined]


def npu_worker() -> dict[str, Any]:
    """In a fresh process: set up and tear down the ``npu`` strategy on the fake torch_npu."""
    import torch.distributed as dist

    calls: list[Any] = []
    sys.meta_path.insert(0, _FakeNPUFinder(calls))
    real = dist.init_process_group

    def init_process_group(backend: str | None = None, **kwargs: Any) -> None:
        calls.append(("init_process_group", backend))
        real("gloo", **kwargs)  # HCCL needs NPUs; the group itself is gloo's

    dist.init_process_group = init_process_group  # type: ignore[assignment]
    from treadle.plugins.strategies.npu import NPUStrategy

    strategy = NPUStrategy()
    device = str(strategy.device)
    strategy.precision = Precision()
    strategy.setup(None)  # type: ignore[arg-type]  (the run is not read)
    world = strategy.world_size
    strategy.teardown()
    calls.append(("destroyed", not dist.is_initialized()))
    return {"calls": calls, "device": device, "world": world}


@pytest.mark.multiprocess
def test_npu_selects_its_device_then_joins_an_hccl_group() -> None:
    results = testing.run_distributed(npu_worker, init_process_group=False, timeout=120)
    for rank, result in enumerate(results):
        assert result["device"] == f"npu:{rank}" and result["world"] == 2
        calls = result["calls"]
        assert calls[:3] == [
            "import torch_npu",
            ("torch.npu.set_device", f"npu:{rank}"),  # before joining: HCCL binds to it
            ("init_process_group", "hccl"),
        ]
        assert set(calls[3:-1]) <= {("torch.npu.set_device", f"npu:{rank}")}  # never another
        assert calls[-1] == ("destroyed", True)  # the group it joined is left at teardown


def test_npu_without_torch_npu_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from treadle.plugins.strategies.npu import NPUStrategy

    monkeypatch.setitem(sys.modules, "torch_npu", None)
    with pytest.raises(MissingDependencyError, match="must match torch exactly"):
        NPUStrategy()
