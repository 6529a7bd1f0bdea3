"""What plugin users and authors get around the registry: ``treadle plugins --verbose``,
environment variables that hide plugins or trace hook calls, declared supported treadle
versions, and an explicit order among plugins that listen to the same hook."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import treadle
from treadle import registry
from treadle.cli import main
from treadle.errors import PluginError, TreadleError

PLUGIN_SOURCE = """
import treadle

@treadle.hookimpl
def on_step_end(run):
    run.log({"acme": 1.0})
"""


def test_plugins_verbose_shows_hooks_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--verbose"]) == 0
    text = capsys.readouterr().out
    lines = text[text.index("  early-stopping") :].splitlines()
    block = "\n".join([lines[0], *itertools.takewhile(lambda x: x.startswith(" " * 6), lines[1:])])
    assert "hooks: " in block and "on_log" in block
    assert "options: " in block and "patience: int = " in block
    assert main(["plugins", "--json", "--verbose"]) == 0
    records = {(r["kind"], r["name"]): r for r in json.loads(capsys.readouterr().out)}
    adamw = records["optimizer", "adamw"]
    assert any(option.startswith("lr") for option in adamw["options"])
    assert "on_log" in records["plugin", "early-stopping"]["hooks"]


def test_a_disabled_name_is_hidden_and_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TREADLE_DISABLE_PLUGINS", "early-stopping, logger:csv")
    registry.refresh()
    try:
        assert "early-stopping" not in registry.entries("plugin")
        assert "csv" not in registry.entries("logger") and "jsonl" in registry.entries("logger")
        with pytest.raises(TreadleError, match="hidden by TREADLE_DISABLE_PLUGINS"):
            registry.load("plugin", "early-stopping")
        assert main(["plugins"]) == 0
        out = capsys.readouterr().out
        assert (
            "hidden by TREADLE_DISABLE_PLUGINS=early-stopping, logger:csv: plugin early-stopping"
            in out
        )
    finally:
        monkeypatch.delenv("TREADLE_DISABLE_PLUGINS")
        registry.refresh()
    assert "early-stopping" in registry.entries("plugin")


def test_hiding_the_defaults_plugin_fails_every_run_clearly(
    regression: tuple[torch.nn.Module, list[dict[str, torch.Tensor]]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    model, data = regression
    monkeypatch.setenv("TREADLE_DISABLE_PLUGINS", "plugin:defaults")
    registry.refresh()
    try:
        with pytest.raises(TreadleError) as info:
            treadle.Run(model, data, config={"output_dir": str(tmp_path)}, loggers=[])
    finally:
        monkeypatch.delenv("TREADLE_DISABLE_PLUGINS")
        registry.refresh()
    assert str(info.value) == (
        "plugin 'defaults' is installed but hidden by TREADLE_DISABLE_PLUGINS=plugin:defaults; "
        "unset it (or remove 'defaults' from it) to use 'defaults'"
    )


def test_autoload_off_keeps_only_first_party_names(
    fake_dist: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dist("acme", {"treadle.plugin": {"acme": "acme_mod"}}, modules={"acme_mod": PLUGIN_SOURCE})
    assert "acme" in registry.entries("plugin")
    monkeypatch.setenv("TREADLE_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry.refresh()
    assert "acme" not in registry.entries("plugin")
    assert "early-stopping" in registry.entries("plugin")  # treadle's own stay
    with pytest.raises(TreadleError, match="hidden by TREADLE_DISABLE_PLUGIN_AUTOLOAD=1"):
        registry.load("plugin", "acme")
    monkeypatch.setenv("TREADLE_DISABLE_PLUGIN_AUTOLOAD", "0")
    registry.refresh()
    assert "acme" in registry.entries("plugin")


@pytest.mark.parametrize(
    ("requirement", "supported"),
    [("treadle>=0.1", True), ("treadle>=99.0", False), ("treadle<0.1", False), ("torch", True)],
)
def test_a_plugin_declares_the_treadle_versions_it_supports(
    fake_dist: Callable[..., Path],
    regression: tuple[torch.nn.Module, list[dict[str, torch.Tensor]]],
    tmp_path: Path,
    requirement: str,
    supported: bool,
) -> None:
    fake_dist(
        "treadle-acme",
        {"treadle.plugin": {"acme": "acme_mod"}},
        modules={"acme_mod": PLUGIN_SOURCE},
        version="2.3",
        requires=[requirement, 'pytest; extra == "test"'],
    )
    model, data = regression
    config = treadle.Config(max_steps=1, output_dir=str(tmp_path), save_at_end=False)
    if supported:
        treadle.Run(model, data, config=config, plugins=["acme"], loggers=[]).fit()
        return
    with pytest.raises(TreadleError) as info:
        treadle.Run(model, data, config=config, plugins=["acme"], loggers=[])
    message = str(info.value)
    assert "treadle-acme 2.3" in message and requirement[len("treadle") :] in message
    assert f"treadle {treadle.__version__} is installed" in message
    # only the run that asks for it fails
    treadle.Run(model, data, config=config, loggers=[]).fit()


def test_trace_hooks_writes_every_call_with_its_plugin(
    monkeypatch: pytest.MonkeyPatch,
    regression: tuple[torch.nn.Module, list[dict[str, torch.Tensor]]],
    tmp_path: Path,
) -> None:
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("TREADLE_TRACE_HOOKS", str(trace))
    model, data = regression

    class Listener:
        @treadle.hookimpl
        def on_step_end(self) -> None:
            pass

    treadle.Run(
        model,
        data,
        config=treadle.Config(max_steps=3, output_dir=str(tmp_path / "out"), save_at_end=False),
        plugins=[Listener()],
        loggers=[],
    ).fit()
    lines = trace.read_text().splitlines()
    steps = [line for line in lines if line.startswith("treadle trace: on_step_end Listener ")]
    assert len(steps) == 3
    assert all(line.endswith(" ms") for line in steps)
    assert any(" compute_loss defaults " in line for line in lines)  # the kernel's default too


def test_no_trace_without_the_variable(
    regression: tuple[torch.nn.Module, list[dict[str, torch.Tensor]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, data = regression
    run = treadle.Run(
        model,
        data,
        config=treadle.Config(max_steps=1, output_dir=str(tmp_path), save_at_end=False),
        loggers=[],
    )
    run.fit()
    assert "treadle trace" not in capsys.readouterr().err
    assert not hasattr(run.listeners["compute_loss"], "_treadle_traced")


class Called:
    def __init__(self, label: str, calls: list[str], order: int | None = None) -> None:
        self.label, self.calls = label, calls
        if order is not None:
            self.treadle_order = order

    @treadle.hookimpl
    def on_step_end(self) -> None:
        self.calls.append(self.label)


def test_treadle_order_orders_listeners_of_one_hook(
    regression: tuple[torch.nn.Module, list[dict[str, torch.Tensor]]], tmp_path: Path
) -> None:
    model, data = regression
    calls: list[str] = []
    run = treadle.Run(
        model,
        data,
        config=treadle.Config(max_steps=1, output_dir=str(tmp_path), save_at_end=False),
        plugins=[
            Called("late", calls, order=10),
            Called("tie-first-listed", calls),
            Called("early", calls, order=-5),
            Called("tie-second-listed", calls),
        ],
        loggers=[],
    )
    run.add_plugin(Called("added", calls, order=5))
    run.fit()
    # lower order first; equal orders: the later registered first (pluggy's rule, kept)
    assert calls == ["early", "tie-second-listed", "tie-first-listed", "added", "late"]


def test_a_bad_order_names_the_plugin(
    regression: tuple[torch.nn.Module, list[dict[str, torch.Tensor]]], tmp_path: Path
) -> None:
    model, data = regression
    with pytest.raises(PluginError, match="treadle_order = '1' must be an int"):
        treadle.Run(
            model,
            data,
            config=treadle.Config(max_steps=1, output_dir=str(tmp_path)),
            plugins=[Called("x", [], order="1")],  # type: ignore[arg-type]
            loggers=[],
        )
