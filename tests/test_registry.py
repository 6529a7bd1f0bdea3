"""Discovery through entry points: lookup without import, clear errors, isolation of breakage."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import toy

import treadle
from treadle import registry
from treadle.errors import PluginLoadError, TreadleError, UnknownNameError

GOOD_PLUGIN = """
import treadle
seen = []

@treadle.hookimpl
def on_step_end(run):
    seen.append(run.state.step)
"""


def test_first_party_components_are_declared_as_entry_points() -> None:
    names = {kind: set(registry.entries(kind)) for kind in registry.KINDS}
    assert "single" in names["strategy"]
    assert "fp32" in names["precision"]
    assert {"adamw", "sgd", "adam"} <= names["optimizer"]
    assert {"cosine", "linear", "constant"} <= names["scheduler"]
    assert {"console", "jsonl"} <= names["logger"]
    assert "safetensors" in names["checkpoint"]
    assert "early-stopping" in names["plugin"]
    for entries in registry.entries("strategy").values():
        assert entries[0].distribution == "treadle"


def test_every_declared_first_party_entry_point_loads() -> None:
    for entry in registry.installed():
        if entry.distribution == "treadle":
            assert registry.load(entry.kind, entry.name) is not None, entry


def test_unknown_name_lists_installed_names_and_closest_match() -> None:
    with pytest.raises(UnknownNameError) as info:
        registry.load("optimizer", "adamm")
    message = str(info.value)
    assert "unknown optimizer 'adamm'" in message
    assert "Did you mean 'adam'?" in message
    assert "Installed optimizer names:" in message and "sgd" in message


def test_unknown_kind() -> None:
    with pytest.raises(TreadleError, match="unknown component kind 'strategies'"):
        registry.entries("strategies")


def test_broken_entry_point_names_itself_and_breaks_only_its_runs(
    fake_dist: Callable[..., Path], tmp_path: Path
) -> None:
    fake_dist(
        "acme-plugins",
        {"treadle.plugin": {"acme-broken": "acme_broken", "acme-good": "acme_good"}},
        modules={"acme_broken": "raise RuntimeError('acme is broken')", "acme_good": GOOD_PLUGIN},
    )
    with pytest.raises(PluginLoadError) as info:
        treadle.Run(toy.model(), toy.train_data(), plugins=["acme-broken"], loggers=[])
    message = str(info.value)
    assert "plugin 'acme-broken'" in message
    assert "'acme_broken'" in message and "'acme-plugins'" in message
    assert "RuntimeError: acme is broken" in message
    # the other plugin of the same distribution, and runs that do not name it, still work
    run = treadle.Run(
        toy.model(),
        toy.train_data(),
        plugins=["acme-good"],
        loggers=[],
        checkpoint=None,
        config=treadle.Config(max_steps=3, output_dir=str(tmp_path)),
    )
    run.fit()
    import acme_good

    assert acme_good.seen == [1, 2, 3]


def test_same_name_from_two_distributions_is_reported_with_both(
    fake_dist: Callable[..., Path],
) -> None:
    fake_dist("acme-one", {"treadle.plugin": {"clash": "mod_one"}}, modules={"mod_one": ""})
    fake_dist(
        "acme-two", {"treadle.plugin": {"clash": "mod_two"}}, modules={"mod_two": ""}, version="2.5"
    )
    with pytest.raises(TreadleError) as info:
        registry.load("plugin", "clash")
    message = str(info.value)
    assert "more than one installed distribution" in message
    assert "acme-one 1.0 (mod_one)" in message and "acme-two 2.5 (mod_two)" in message


def test_listing_reads_metadata_without_importing(fake_dist: Callable[..., Path]) -> None:
    fake_dist(
        "acme-lister",
        {"treadle.logger": {"acme-log": "acme_never_imported:Logger"}},
        modules={"acme_never_imported": "raise SystemExit('must not be imported')"},
    )
    rows = [e for e in registry.installed() if e.distribution == "acme-lister"]
    assert rows == [
        registry.Entry("logger", "acme-log", "acme_never_imported:Logger", "acme-lister", "1.0")
    ]
    assert "acme_never_imported" not in sys.modules


def test_treadle_plugins_command_lists_by_kind_without_importing_plugins() -> None:
    code = (
        "import sys; from treadle.cli import main; main(['plugins']);"
        "own = ('treadle.plugins.commands', 'treadle.plugins.commands.plugins');"
        "bad = sorted(m for m in sys.modules if m.startswith('treadle.plugins.') and m not in own);"
        "print('IMPORTED', bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "strategy:" in out and "optimizer:" in out and "logger:" in out
    assert (
        "single" in out
        and "treadle 0.1.0" in out
        and "treadle.plugins.strategies.single:SingleDevice" in out
    )
    assert "IMPORTED []" in out


def test_an_installed_command_is_a_treadle_subcommand(
    fake_dist: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from treadle import cli

    fake_dist(
        "acme-cli",
        {"treadle.command": {"greet": "acme_cli:main"}},
        modules={"acme_cli": "def main(args):\n    print('hello', *args)\n    return 3\n"},
    )
    assert cli.main(["greet", "--loud", "world"]) == 3  # its exit code, its arguments as given
    assert capsys.readouterr().out == "hello --loud world\n"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "installed by acme-cli 1.0" in capsys.readouterr().out


def test_version_and_plugins_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from treadle import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"treadle {treadle.__version__}\n"
    assert cli.main(["plugins", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    ddp = next(e for e in listed if (e["kind"], e["name"]) == ("strategy", "ddp"))
    assert ddp == {
        "kind": "strategy", "name": "ddp", "value": "treadle.plugins.strategies.ddp:DDPStrategy",
        "distribution": "treadle", "version": treadle.__version__,
    }  # fmt: skip
