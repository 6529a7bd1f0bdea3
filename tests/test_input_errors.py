"""Bad values, contradictions and run files: each refused (or warned about) by name, early."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
import toy
from torch.utils.data import DataLoader

import treadle
from treadle.cli import main
from treadle.errors import ConfigError, TreadleError, TreadleWarning
from treadle.plugins.commands.runfile import build_run

# ------------------------------------------------------------------ Config


@pytest.mark.parametrize(
    "build",
    [
        lambda: treadle.Config(grad_acum_steps=2),  # type: ignore[call-arg]
        lambda: treadle.Config.from_dict({"grad_acum_steps": 2}),
        lambda: treadle.Config().replace(grad_acum_steps=2),
        lambda: attrs.evolve(treadle.Config(), grad_acum_steps=2),
    ],
    ids=["Config", "from_dict", "replace", "evolve"],
)
def test_an_unknown_field_names_the_closest_on_every_path(build: Any) -> None:
    with pytest.raises(ConfigError, match=r"'grad_acum_steps'\. Did you mean 'grad_accum_steps'"):
        build()


def test_config_refuses_positional_arguments_and_non_string_keys() -> None:
    with pytest.raises(ConfigError, match="keyword arguments only"):
        treadle.Config(10)  # type: ignore[misc]
    with pytest.raises(ConfigError, match="unknown config key 3"):
        treadle.Config.from_dict({3: 1})
    with pytest.raises(ConfigError, match="must be a mapping"):
        treadle.Config.from_dict([("max_steps", 1)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"seed": 2**32}, "Config.seed = 4294967296 is not allowed: expected an integer from 0"),
        ({"seed": -1}, "Config.seed = -1 is not allowed"),
        ({"output_dir": ""}, "Config.output_dir = '' is not allowed: expected a non-empty path"),
        ({"output_dir": "  "}, "Config.output_dir = '  ' is not allowed"),
        ({"output_dir": "a\0b"}, "a path cannot contain a NUL character"),
        ({"output_dir": 3}, "Config.output_dir = 3 is not allowed: expected a path"),
        ({"resume": "x\0"}, "Config.resume = 'x\\x00' is not allowed"),
    ],
)
def test_values_checked_deep_inside_numpy_or_pathlib_are_refused_by_name(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        treadle.Config(**fields)
    assert message in str(info.value)


def test_the_largest_seed_is_accepted(tmp_path: Path) -> None:
    run = treadle.Run(toy.model(), toy.train_data(n=8), loggers=[], checkpoint=None,
                      config={"seed": 2**32 - 1, "max_steps": 1, "output_dir": str(tmp_path)})  # fmt: skip
    assert run.fit().step == 1


@pytest.mark.parametrize("where", [".", "sub"])
def test_an_output_dir_that_is_a_file_or_under_one_is_refused_at_composition(
    tmp_path: Path, where: str
) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    output_dir = a_file / where
    with pytest.raises(ConfigError, match=r"Config\.output_dir = .* is a file, not a directory"):
        treadle.Run(toy.model(), toy.train_data(), config={"output_dir": str(output_dir)})
    run = treadle.Run(toy.model(), toy.train_data(), config={"output_dir": str(tmp_path / "ok")})
    with pytest.raises(ConfigError, match="is a file"):
        run.fit(output_dir=str(output_dir))


# ------------------------------------------------------------------ contradictions


@pytest.mark.parametrize("field", [{"eval_every": 2}, {"eval_every_epoch": True}])
def test_evaluating_without_eval_data_is_refused_at_run_and_at_fit(
    tmp_path: Path, field: dict[str, Any]
) -> None:
    (name,) = field
    with pytest.raises(ConfigError, match=rf"Config\.{name} = .* no eval_data was given"):
        treadle.Run(toy.model(), toy.train_data(), config=field)
    run = treadle.Run(toy.model(), toy.train_data(), config={"output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=rf"Config\.{name}"):
        run.fit(**field)


def test_keep_best_on_an_eval_metric_without_eval_data_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"Config.monitor \(keep_best\) 'eval/loss' .* never"):
        treadle.Run(toy.model(), toy.train_data(), config={"keep_best": 1, "monitor": "eval/loss"})


def test_keep_best_on_an_eval_set_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ConfigError, match="the eval sets are named 'val'"):
        treadle.Run(toy.model(), toy.train_data(), eval_data={"val": toy.train_data(n=8)},
                    config={"keep_best": 1, "monitor": "eval/loss"})  # fmt: skip


def test_keep_best_when_eval_runs_only_at_the_end_warns_it_acts_once() -> None:
    with pytest.warns(TreadleWarning, match="logged only once, at the end of fit"):
        treadle.Run(toy.model(), toy.train_data(), eval_data=toy.train_data(n=8),
                    config={"keep_best": 1, "monitor": "eval/loss"})  # fmt: skip
    with pytest.raises(ConfigError, match="never logged: evaluation runs never"):
        treadle.Run(toy.model(), toy.train_data(), eval_data=toy.train_data(n=8),
                    config={"keep_best": 1, "monitor": "eval/loss", "eval_at_end": False})  # fmt: skip


def test_keep_best_whose_metric_is_never_logged_warns_at_the_end_of_fit(tmp_path: Path) -> None:
    run = treadle.Run(toy.model(), toy.train_data(), loggers=[],
                      config={"keep_best": 1, "monitor": "los", "max_steps": 2,
                              "output_dir": str(tmp_path), "log_every": 1})  # fmt: skip
    with pytest.warns(TreadleWarning, match=r"Config.monitor 'los' was never logged .* loss"):
        run.fit()


def test_batch_options_with_a_ready_dataloader_warn_naming_the_fields() -> None:
    loader = DataLoader(toy.dataset(), batch_size=4)
    with pytest.warns(TreadleWarning) as caught:
        treadle.Run(toy.model(), loader, config={"batch_size": 3, "shuffle": False})
    message = str(caught[0].message)
    assert "Config.batch_size=3, Config.shuffle=False cannot take effect" in message
    assert "Set these on the DataLoader" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        treadle.Run(toy.model(), loader)  # the defaults say nothing
        # batch_size still batches a Dataset given as eval data: it takes effect
        treadle.Run(toy.model(), loader, eval_data=toy.dataset(), config={"batch_size": 3})


def test_batch_options_are_checked_again_when_fit_is_given_a_ready_dataloader(
    tmp_path: Path,
) -> None:
    run = treadle.Run(toy.model(), toy.train_data(), loggers=[], checkpoint=None,
                      config={"batch_size": 4, "max_steps": 1, "output_dir": str(tmp_path)})  # fmt: skip
    with pytest.warns(TreadleWarning, match=r"Config.batch_size=4 cannot take effect"):
        run.fit(train_data=DataLoader(toy.dataset(), batch_size=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TreadleWarning)
        run.fit(max_steps=2)  # the same data and options: said once is enough


def test_optimizer_options_the_factory_refuses_name_the_optimizer(tmp_path: Path) -> None:
    def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr="fast")  # type: ignore[arg-type]

    run = treadle.Run(toy.model(), toy.train_data(), loggers=[], optimizer=sgd,
                      config={"max_steps": 1, "output_dir": str(tmp_path)})  # fmt: skip
    with pytest.raises(ConfigError, match=r"optimizer \{'name': 'sgd'\}: building it raised Type"):
        run.fit()


# ------------------------------------------------------------------ run files

_HEAD = 'model = "toy:model"\ntrain_data = "toy:train_data"\n'


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_HEAD + 'config = "fast"\n', r"\[config\] must be a table .* got str 'fast'"),
        (_HEAD + "config = [1, 2]\n", r"\[config\] must be a table"),
        (
            'model = {factory = "toy:model", widht = 3}\ntrain_data = "toy:train_data"\n',
            r"model: toy:model does not accept the options \['widht'\] .* Accepted options: width, "
            r"dropout",
        ),
        (
            'model = "toy:model"\ntrain_data = {factory = "toy:train_data", n = -1}\n',
            r"train_data: the factory toy:train_data raised",
        ),
        (
            'model = {name = "x"}\ntrain_data = "toy:train_data"\n',
            r"model must be 'package.module:factory' or a table with factory",
        ),
        (_HEAD + "loss_fn = {f = 1}\n", r"loss_fn: expected an import path"),
        (_HEAD + "strategy = {x = 1}\n", r"strategy: a strategy given as a mapping needs a 'name'"),
        (_HEAD + "loggers = [3]\n", r"logger must be a name"),
        (_HEAD + 'plugins = "nosuchplugin"\n', r"unknown plugin 'nosuchplugin'"),
        (
            _HEAD + 'plugins = [{import = "toy:Pairs", m = 1}]\n',
            r"plugins \(toy:Pairs\): .*"
            r"does not accept the options \['m'\]",
        ),
        (
            _HEAD + 'plugins = [{import = "toy:model", m = 1}]\n',
            r"not a class and takes no options",
        ),
        (
            _HEAD + "[config]\nmax_step = 3\n",
            r"\[config\]: unknown config key 'max_step'\. Did you",
        ),
        (_HEAD + "[config\n", r"cannot read run file"),
    ],
)
def test_bad_run_files_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = _file(tmp_path, text)
    with pytest.raises(TreadleError) as info:  # ConfigError, or UnknownNameError for a name
        build_run(path)
    assert str(path) in str(info.value)
    assert info.match(message)


def test_a_binary_run_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot read run file"):
        build_run(path)


def test_a_single_logger_or_plugin_name_is_a_list_of_one(tmp_path: Path) -> None:
    path = _file(tmp_path, _HEAD + 'loggers = "jsonl"\nplugins = "early-stopping"\n'
                 f'eval_data = "toy:train_data"\n[config]\noutput_dir = "{tmp_path}"\n'
                 "eval_every = 1\n")  # fmt: skip
    run = build_run(path)
    assert [logger.name for logger in run.loggers] == ["jsonl"]
    assert run.plugin_manager.has_plugin("early-stopping")


def test_main_reports_a_bad_run_file_as_a_treadle_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _file(tmp_path, _HEAD + "config = 3\n")
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"treadle: error: run file {path}: [config]")
