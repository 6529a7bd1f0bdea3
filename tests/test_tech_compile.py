"""The ``compile`` plugin: torch.compile in place, the same losses, the same checkpoint keys,
a report of graph breaks and recompilations; and the zoo benchmark's accuracy check and table.

Most tests use the ``eager``/``aot_eager`` backends or a counting backend (dynamo traces, no
kernels are generated), one small test uses inductor.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import toy
from safetensors.torch import load_file
from torch import nn

import treadle
from treadle.errors import ConfigError, TreadleWarning
from treadle.plugins.strategies.single import SingleDevice
from treadle.plugins.techniques.compile import Compile


class Recorder:
    """Every step's loss and every logged record."""

    name = "recorder"

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.logs: list[dict[str, float]] = []

    @treadle.hookimpl
    def on_step_end(self, loss: torch.Tensor) -> None:
        self.losses.append(float(loss))

    @treadle.hookimpl
    def on_log(self, metrics: Mapping[str, float]) -> None:
        self.logs.append(dict(metrics))

    def value(self, key: str) -> float:
        values = [record[key] for record in self.logs if key in record]
        assert len(values) == 1, f"{key} logged {len(values)} times"
        return values[0]


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them as they are."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs.append(gm)
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()  # no cached graph from another test decides what compiles here


def make_run(
    tmp_path: Path,
    plugins: list[Any],
    data: Any = None,
    checkpoint: str | None = None,
    **config: Any,
) -> tuple[treadle.Run, Recorder]:
    torch.manual_seed(0)
    recorder = Recorder()
    options = {"max_steps": 6, "log_every": 2, "output_dir": str(tmp_path), "seed": 0, **config}
    run = treadle.Run(
        toy.model(),
        toy.train_data() if data is None else data,
        config=treadle.Config(**options),
        optimizer={"name": "adamw", "lr": 1e-2},
        loggers=[],
        checkpoint=checkpoint,
        plugins=[recorder, *plugins],
    )
    return run, recorder


@pytest.mark.timeout(120)
def test_compiled_forward_is_used_and_losses_equal_eager(tmp_path: Path) -> None:
    backend = CountingBackend()
    eager, eager_losses = make_run(tmp_path / "eager", [])
    eager.fit()
    compiled, compiled_losses = make_run(tmp_path / "compiled", [Compile(backend=backend)])
    compiled.fit()
    assert backend.graphs, "the compiled module was never called"
    assert compiled_losses.losses == pytest.approx(eager_losses.losses, rel=1e-6, abs=1e-7)
    assert compiled.model is compiled.wrapped_model  # compiled in place, not wrapped


@pytest.mark.timeout(120)
def test_aot_eager_losses_equal_eager(tmp_path: Path) -> None:
    eager, eager_losses = make_run(tmp_path / "eager", [])
    eager.fit()
    compiled, compiled_losses = make_run(tmp_path / "compiled", [Compile(backend="aot_eager")])
    compiled.fit()
    assert compiled_losses.value("compile/graphs") >= 1
    assert compiled_losses.losses == pytest.approx(eager_losses.losses, rel=1e-5, abs=1e-6)


@pytest.mark.timeout(120)
def test_checkpoint_keeps_plain_keys_and_resume_is_exact(tmp_path: Path) -> None:
    plugin = {"name": "compile", "backend": "eager"}
    full, _ = make_run(tmp_path / "full", [plugin], save_every=3, checkpoint="safetensors")
    full.fit()
    saved = tmp_path / "full" / "checkpoints" / "step-000003" / "model.safetensors"
    tensors = load_file(saved)
    plain = toy.model()
    assert sorted(tensors) == sorted(plain.state_dict())  # no "_orig_mod." anywhere
    plain.load_state_dict(tensors, strict=True)

    torch._dynamo.reset()
    resumed, recorder = make_run(
        tmp_path / "resumed",
        [dict(plugin)],
        checkpoint="safetensors",
        resume=str(saved.parent),
    )
    resumed.fit()
    assert len(recorder.losses) == 3  # steps 4..6
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


@pytest.mark.timeout(120)
def test_compiled_once_per_run_even_when_fit_again(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path, [Compile(backend="eager")], max_steps=2)
    run.fit()
    compiled_call = run.wrapped_model._compiled_call_impl
    assert compiled_call is not None
    run.fit(max_steps=4)
    assert run.wrapped_model._compiled_call_impl is compiled_call


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "fastest"}, "'max-autotune'"),
        ({"backend": "no-such-backend"}, "inductor"),
        ({"backend": 3}, "backend name"),
        ({"backend": "eager", "mode": "max-autotune"}, "needs backend='inductor'"),
        ({"fullgraph": "yes"}, "fullgraph"),
        ({"dynamic": 1}, "dynamic"),
        ({"compile_optimizer": None}, "compile_optimizer"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Compile(**options)


def test_bad_option_by_name_fails_when_the_run_is_composed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="installed ones"):
        make_run(tmp_path, [{"name": "compile", "backend": "nope"}])


class Engine(nn.Module):
    """A wrapper with its own ``compile`` (as DeepSpeed's engine has)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("the plugin must not call an engine's own compile")


class EngineStrategy(SingleDevice):
    name = "engine"

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return Engine(super().wrap_model(model))


def test_a_strategy_whose_engine_compiles_itself_is_refused(tmp_path: Path) -> None:
    run = treadle.Run(
        toy.model(),
        toy.train_data(),
        config=treadle.Config(max_steps=1, output_dir=str(tmp_path)),
        strategy=EngineStrategy(),
        loggers=[],
        checkpoint=None,
        plugins=[Compile(backend="eager")],
    )
    with pytest.raises(ConfigError, match="has its own compile"):
        run.fit()


class Chatty(nn.Module):
    """The toy regression with a planted graph break (a host read of a tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = toy.model()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.isnan().any().item():  # a host read: dynamo must split the graph here
            raise ValueError("nan in the input")
        return self.inner(x, y)  # type: ignore[no-any-return]


@pytest.mark.timeout(120)
def test_graph_breaks_are_reported_once(tmp_path: Path) -> None:
    recorder = Recorder()
    run = treadle.Run(
        Chatty(),
        toy.train_data(),
        config=treadle.Config(max_steps=4, output_dir=str(tmp_path)),
        loggers=[],
        checkpoint=None,
        plugins=[recorder, Compile(backend="eager")],
    )
    with pytest.warns(TreadleWarning, match=r"compile: 1 graph break\(s\).*") as caught:
        run.fit()
    breaks = [w for w in caught if "graph break" in str(w.message)]
    assert len(breaks) == 1
    assert recorder.value("compile/graph_breaks") == 1


@pytest.mark.timeout(120)
def test_recompilations_are_reported_with_their_reason(tmp_path: Path) -> None:
    data = toy.train_data(n=60)  # the last batch has 4 rows: a new shape, a recompilation
    run, recorder = make_run(tmp_path, [Compile(backend="eager")], data=data, max_steps=8)
    with pytest.warns(TreadleWarning, match=r"compile: 1 recompilation\(s\).*size mismatch"):
        run.fit()
    assert recorder.value("compile/recompiles") == 1
    assert recorder.value("compile/graph_breaks") == 0


@pytest.mark.timeout(120)
def test_compiled_optimizer_step_with_a_scheduler(tmp_path: Path) -> None:
    backend = CountingBackend()
    runs = {}
    for name, plugins in {
        "eager": [],
        "model-only": [Compile(backend=CountingBackend())],
        "with-optimizer": [Compile(backend=backend, compile_optimizer=True)],
    }.items():
        torch._dynamo.reset()
        torch.manual_seed(0)
        recorder = Recorder()
        run = treadle.Run(
            toy.model(),
            toy.train_data(),
            config=treadle.Config(max_steps=6, output_dir=str(tmp_path / name)),
            optimizer={"name": "adamw", "lr": 1e-2},
            scheduler={"name": "cosine", "warmup_steps": 2},
            loggers=[],
            checkpoint=None,
            plugins=[recorder, *plugins],
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
            run.fit()
        runs[name] = (run, recorder)
    optimizer_graphs = [
        g
        for g in backend.graphs
        if "param_groups" in str(g.code) or "exp_avg" in str(g.code) or "_foreach" in str(g.code)
    ]
    assert optimizer_graphs, "the optimizer step was not compiled"
    assert runs["with-optimizer"][1].value("compile/graphs") > runs["model-only"][1].value(
        "compile/graphs"
    )
    assert runs["with-optimizer"][1].losses == pytest.approx(
        runs["eager"][1].losses, rel=1e-5, abs=1e-6
    )
    # the scheduler changed lr every step: recompiled at most once (lr becomes dynamic)
    assert runs["with-optimizer"][1].value("compile/recompiles") <= 1


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_inductor_matches_eager_on_a_tiny_model(tmp_path: Path) -> None:
    eager, eager_losses = make_run(tmp_path / "eager", [], max_steps=3)
    eager.fit()
    compiled, compiled_losses = make_run(tmp_path / "inductor", [Compile()], max_steps=3)
    compiled.fit()
    assert compiled_losses.value("compile/compile_time_s") > 0
    assert compiled_losses.losses == pytest.approx(eager_losses.losses, rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------ the zoo's machinery


def test_zoo_accuracy_check_is_the_dynamo_runners() -> None:
    from tests.bench.zoo import accuracy_passes

    fp64 = [9.0, 8.9, 8.8, 8.7]
    ref = [9.0001, 8.9001, 8.8001, 8.7001]
    assert accuracy_passes(ref, [9.001, 8.899, 8.801, 8.699], fp64, 1e-2)  # allclose at tol
    assert not accuracy_passes(ref, [9.0, 8.9, 8.8, 9.5], fp64, 1e-2)  # one loss far off
    # far from ref, but no farther from float64 than ref itself: the RMSE rule passes it
    assert accuracy_passes([9.2, 9.1, 9.0, 8.9], [8.8, 8.7, 8.6, 8.5], fp64, 1e-2)
    assert not accuracy_passes(ref, ref[:3], fp64, 1e-2)


def _worker(losses: list[float], measured_s: float, warmup_s: float = 1.0) -> dict[str, Any]:
    return {
        "losses": losses,
        "step_times_s": [measured_s / 2] * 2,
        "measured_s": measured_s,
        "warmup_s": warmup_s,
        "compile": {},
        "break_reasons": [],
    }


def test_zoo_summary_table_and_targets_on_fake_numbers(tmp_path: Path) -> None:
    from tests.bench import zoo

    losses = [9.0, 8.9, 8.8]
    fast = {
        "bare": _worker(losses, 2.0),
        "treadle": _worker(losses, 2.0),
        "compiled": {
            **_worker(losses, 1.0, warmup_s=31.0),
            "compile": {"compile/graph_breaks": 0, "compile/recompiles": 0},
        },
    }
    slow = {
        "bare": _worker(losses, 2.0),
        "treadle": _worker(losses, 2.1),
        "compiled": {
            **_worker([9.0, 8.9, 9.9], 4.0),
            "compile": {"compile/graph_breaks": 2, "compile/recompiles": 0},
            "break_reasons": ["logging.Logger method not supported"],
        },
    }
    fp64 = {"losses": losses}
    rows = [
        zoo.summarise("a", "A", 1e-2, fp64, [fast], batch_size=4, warmup=1),
        zoo.summarise("b", "B", 1e-2, fp64, [slow], batch_size=4, warmup=1),
    ]
    a, b = rows
    assert a.accuracy == "pass" and b.accuracy == "FAIL"
    assert a.speedup_compiled == 2.0 and a.bare_samples_per_s == 4 * 2 / 2.0
    assert a.compile_s == pytest.approx(30.5)  # 31 - 0.5 steady, less treadle's 1 - 1
    assert b.speedup_treadle == pytest.approx(2.0 / 2.1) and b.graph_breaks == 2
    # accuracy (b fails), eager overhead (b at 0.95x), the median compiled speedup (1.25x)
    assert [t.met for t in zoo.targets(rows)] == [False, False, True]
    text = zoo.markdown(rows, {"rounds": 1})
    assert "| b (B) | FAIL |" in text and "**NOT met**" in text
    assert "- b: compiled 0.50x vs eager 0.95x bare; 2 graph break(s): logging.Logger" in text
    zoo.write_csv(tmp_path / "zoo.csv", rows)
    assert (tmp_path / "zoo.csv").read_text().splitlines()[0].startswith("model,hf_class")
