"""Everything checkable is checked when the run is composed, with messages that say what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import toy

import treadle
from treadle.errors import ConfigError, PluginError, UnknownNameError


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"grad_accum_steps": 0},
            "Config.grad_accum_steps = 0 is not allowed: expected an integer >= 1",
        ),
        (
            {"max_steps": -5},
            "Config.max_steps = -5 is not allowed: expected an integer >= 1 or None",
        ),
        ({"max_steps": 2.5}, "Config.max_steps = 2.5 is not allowed"),
        (
            {"loss_normalization": "sum"},
            "Config.loss_normalization = 'sum' is not allowed: expected one of 'mean', 'tokens'",
        ),
        ({"monitor_mode": "best"}, "expected one of 'min', 'max'"),
        ({"shuffle": "yes"}, "Config.shuffle = 'yes' is not allowed: expected True or False"),
        ({"log_every": True}, "Config.log_every = True is not allowed: expected an integer >= 0"),
        ({"keep_best": 2}, "Config.keep_best = 2 is not allowed: needs Config.monitor"),
    ],
)
def test_invalid_config_values(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        treadle.Config(**fields)
    assert message in str(info.value)


def test_unknown_config_key_names_the_closest() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'grad_acum_steps'\. Did you mean 'grad_accum_steps'\?",
    ):
        treadle.Config.from_dict({"grad_acum_steps": 2})


def test_config_mapping_is_validated_by_run() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'epochs'"):
        treadle.Run(toy.model(), toy.train_data(), config={"epochs": 3})


@pytest.mark.parametrize(
    ("option", "value", "kind", "suggestion"),
    [
        ("strategy", "singel", "strategy", "single"),
        ("optimizer", "adamm", "optimizer", "adam"),
        ("scheduler", {"name": "cosin"}, "scheduler", "cosine"),
        ("loggers", ["jsnl"], "logger", "jsonl"),
        ("checkpoint", "safetensor", "checkpoint", "safetensors"),
        ("plugins", ["early-stoping"], "plugin", "early-stopping"),
        ("precision", "fp23", "precision", "fp32"),
    ],
)
def test_unknown_component_names(option: str, value: Any, kind: str, suggestion: str) -> None:
    with pytest.raises(UnknownNameError) as info:
        treadle.Run(toy.model(), toy.train_data(), **{option: value})
    message = str(info.value)
    assert f"unknown {kind} " in message
    assert f"Did you mean {suggestion!r}?" in message
    assert f"Installed {kind} names:" in message


def test_invalid_component_options_name_the_component_and_allowed_options() -> None:
    with pytest.raises(ConfigError) as info:
        treadle.Run(toy.model(), toy.train_data(), strategy={"name": "single", "gpu": 1})
    assert "strategy 'single': invalid options ['gpu']" in str(info.value)
    assert "Allowed options: device" in str(info.value)


def test_mapping_without_name() -> None:
    with pytest.raises(ConfigError, match=r"a optimizer given as a mapping needs a 'name' key"):
        treadle.Run(toy.model(), toy.train_data(), optimizer={"lr": 0.1})


def test_wrong_types() -> None:
    with pytest.raises(ConfigError, match=r"model must be a torch.nn.Module, got str"):
        treadle.Run("gpt2", toy.train_data())  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError,
        match=r"strategy must be a name, a .* or a treadle.components.Strategy instance; got int",
    ):
        treadle.Run(toy.model(), toy.train_data(), strategy=3)
    with pytest.raises(ConfigError, match=r"plugin .* is a class: pass an instance"):
        treadle.Run(toy.model(), toy.train_data(), plugins=[treadle.Logger])


def test_misspelled_hook_fails_at_compose_time() -> None:
    class Typo:
        @treadle.hookimpl
        def on_stpe_end(self, run: Any) -> None: ...

    with pytest.raises(PluginError) as info:
        treadle.Run(toy.model(), toy.train_data(), plugins=[Typo()])
    assert (
        str(info.value)
        == "plugin 'Typo', hook 'on_stpe_end': no such hook. Did you mean 'on_step_end'?"
    )
    assert info.value.plugin == "Typo" and info.value.hook == "on_stpe_end"


def test_hook_argument_that_does_not_exist_fails_at_compose_time() -> None:
    class BadArgument:
        @treadle.hookimpl
        def on_step_end(self, run: Any, lost: Any) -> None: ...

    with pytest.raises(PluginError) as info:
        treadle.Run(toy.model(), toy.train_data(), plugins=[BadArgument()])
    assert "plugin 'BadArgument', hook 'on_step_end'" in str(info.value)
    assert "lost" in str(info.value)


def test_exception_in_a_hook_names_plugin_and_hook(tmp_path: Path) -> None:
    class Exploding:
        name = "exploding"

        @treadle.hookimpl
        def on_step_end(self, run: Any) -> None:
            if run.state.step == 2:
                raise ValueError("boom at two")

    seen = []

    class Witness:
        @treadle.hookimpl
        def on_exception(self, exception: BaseException) -> None:
            seen.append(exception)

    run = treadle.Run(
        toy.model(),
        toy.train_data(),
        config=treadle.Config(max_steps=5, output_dir=str(tmp_path)),
        loggers=[],
        plugins=[Exploding(), Witness()],
    )
    with pytest.raises(PluginError) as info:
        run.fit()
    assert str(info.value) == "plugin 'exploding', hook 'on_step_end': ValueError: boom at two"
    assert isinstance(info.value.__cause__, ValueError)
    assert [type(e) for e in seen] == [ValueError]
    assert run.state.step == 2


def test_model_errors_are_not_blamed_on_a_plugin(tmp_path: Path) -> None:
    run = treadle.Run(
        toy.model(),
        [{"x": toy.samples()[0][:4], "z": toy.samples()[1][:4]}],
        config=treadle.Config(max_steps=1, output_dir=str(tmp_path)),
        loggers=[],
    )
    # named as the batch not fitting the model's forward, not blamed on a plugin
    with pytest.raises(treadle.TreadleError, match=r"step 0 does not fit the model") as caught:
        run.fit()
    assert not isinstance(caught.value, treadle.PluginError)
    assert "unexpected key 'z'; missing argument 'y'" in str(caught.value)


def test_dataset_without_batch_size(tmp_path: Path) -> None:
    run = treadle.Run(
        toy.model(), toy.dataset(), config=treadle.Config(output_dir=str(tmp_path)), loggers=[]
    )
    with pytest.raises(
        ConfigError, match=r"train_data is a Dataset, so Config.batch_size must be set"
    ):
        run.fit()


def test_iterable_without_length_needs_max_steps(tmp_path: Path) -> None:
    def batches() -> Any:
        yield from toy.train_data()

    run = treadle.Run(
        toy.model(), batches(), config=treadle.Config(output_dir=str(tmp_path)), loggers=[]
    )
    with pytest.raises(
        ConfigError, match=r"train_data has no length, so Config.max_steps must be set"
    ):
        run.fit()


def test_model_without_loss(tmp_path: Path) -> None:
    model = torch_linear()
    config = treadle.Config(max_steps=1, save_at_end=False, output_dir=str(tmp_path))
    run = treadle.Run(model, [torch_ones()], config=config, loggers=[])
    with pytest.raises(
        treadle.TreadleError, match=r"at step 0 the model returned a tensor .* with no loss"
    ):
        run.fit()


def torch_linear() -> Any:
    import torch

    return torch.nn.Linear(4, 1)


def torch_ones() -> Any:
    import torch

    return torch.ones(2, 4)


def test_resume_without_checkpoint_format() -> None:
    with pytest.raises(ConfigError, match=r"Config.resume is set but checkpoint=None"):
        treadle.Run(
            toy.model(), toy.train_data(), config=treadle.Config(resume="auto"), checkpoint=None
        )
