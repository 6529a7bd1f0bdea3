"""A plugin that fails or does nothing is named: constructor, import, hooks, blame, decorators."""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import toy

import treadle
from treadle.errors import ConfigError, PluginError, PluginLoadError, TreadleWarning
from treadle.plugins.commands.runfile import build_run

_BROKEN = {
    "boom_init": """
        import treadle
        class Boom:
            def __init__(self, level=1):
                raise RuntimeError("no GPU here")
            @treadle.hookimpl
            def on_fit_begin(self):
                pass
    """,
    "boom_exit": "import sys\nsys.exit(3)\n",
}


@pytest.fixture
def broken(fake_dist: Callable[..., Path]) -> None:
    fake_dist(
        "treadle-broken",
        {"treadle.plugin": {"boom-init": "boom_init:Boom", "boom-exit": "boom_exit"}},
        modules=_BROKEN,
    )


def test_a_plugin_whose_constructor_raises_is_named(broken: None) -> None:
    with pytest.raises(PluginError, match=r"plugin 'boom-init', hook '__init__': building it "
                       r"with options \{'level': 2\} raised RuntimeError: no GPU here"):  # fmt: skip
        treadle.Run(toy.model(), toy.train_data(), plugins=[{"name": "boom-init", "level": 2}])


def test_a_plugin_module_calling_sys_exit_at_import_is_a_load_error(broken: None) -> None:
    with pytest.raises(PluginLoadError) as info:
        treadle.Run(toy.model(), toy.train_data(), plugins=["boom-exit"])
    assert "plugin 'boom-exit' (entry point 'boom_exit' of distribution 'treadle-broken') " \
        "called sys.exit(3) while being imported" in str(info.value)  # fmt: skip


def test_a_run_file_plugin_class_whose_constructor_raises_is_named(tmp_path: Path) -> None:
    (tmp_path / "failing_plugin.py").write_text(
        "class Failing:\n    def __init__(self, x=1):\n        raise OSError('disk')\n"
    )
    path = tmp_path / "run.toml"
    path.write_text('model = "toy:model"\ntrain_data = "toy:train_data"\n'
                    'plugins = [{import = "failing_plugin:Failing", x = 2}]\n')  # fmt: skip
    with pytest.raises(ConfigError, match=r"plugins.*failing_plugin:Failing raised OSError: disk"):
        build_run(path)


def test_on_init_end_raising_names_plugin_and_hook() -> None:
    class Checker:
        @treadle.hookimpl
        def on_init_end(self, run: treadle.Run) -> None:
            raise KeyError("vocab")

    with pytest.raises(PluginError, match=r"plugin 'Checker', hook 'on_init_end': KeyError"):
        treadle.Run(toy.model(), toy.train_data(), plugins=[Checker()])


class _Sink(treadle.Logger):
    def __init__(self, name: str, fail: bool) -> None:
        self.name = name  # type: ignore[misc]
        self.fail = fail

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.fail:
            raise OSError(f"{self.name} lost its connection")


@pytest.mark.parametrize("failing", [0, 1])
def test_with_two_loggers_of_one_class_the_failing_one_is_blamed(
    tmp_path: Path, failing: int
) -> None:
    names = ["first-sink", "second-sink"]
    loggers = [_Sink(name, fail=i == failing) for i, name in enumerate(names)]
    run = treadle.Run(toy.model(), toy.train_data(), loggers=loggers, checkpoint=None,
                      config={"max_steps": 2, "log_every": 1, "output_dir": str(tmp_path)})  # fmt: skip
    with pytest.raises(PluginError) as info:
        run.fit()
    assert info.value.plugin == names[failing]
    assert info.value.hook == "on_log"


def test_an_undecorated_hook_method_warns_naming_it_and_the_fix() -> None:
    class Half:
        @treadle.hookimpl
        def on_fit_begin(self) -> None:
            pass

        def on_step_end(self, run: treadle.Run) -> None:  # forgot @treadle.hookimpl
            pass

    with pytest.warns(TreadleWarning, match=r"plugin 'Half': on_step_end is named like a "
                      r"treadle hook but not decorated.*@treadle.hookimpl"):  # fmt: skip
        treadle.Run(toy.model(), toy.train_data(), plugins=[Half()])


def test_an_undecorated_function_in_a_plugin_module_warns() -> None:
    module = types.ModuleType("half_module")

    @treadle.hookimpl
    def on_fit_end() -> None:
        pass

    def compute_loss(run: Any, model: Any, batch: Any) -> Any:
        return None

    module.on_fit_end, module.compute_loss = on_fit_end, compute_loss  # type: ignore[attr-defined]
    with pytest.warns(TreadleWarning, match="'half_module': compute_loss is named like"):
        treadle.Run(toy.model(), toy.train_data(), plugins=[module])


class _ForeignCallback:
    """Looks like another library's callback: hook-like names, no treadle decorators."""

    def on_step_end(self, args: Any, state: Any, control: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (
            _ForeignCallback(),
            r"plugin '_ForeignCallback' .*implements no treadle hook.*Its methods "
            r"on_step_end are named like hooks.*install the treadle adapter package",
        ),
        (object(), r"plugin 'object' .*implements no treadle hook, so it would do nothing"),
        (types.ModuleType("empty_module"), r"plugin 'empty_module' .*implements no treadle hook"),
    ],
)
def test_a_plugin_with_no_hook_implementation_is_refused(plugin: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        treadle.Run(toy.model(), toy.train_data(), plugins=[plugin])
    run = treadle.Run(toy.model(), toy.train_data())
    with pytest.raises(ConfigError, match="implements no treadle hook"):
        run.add_plugin(plugin)


def test_components_without_hooks_are_fine() -> None:
    class Quiet(treadle.Logger):
        name = "quiet"

        def log(self, metrics: Mapping[str, float], step: int) -> None:
            pass

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        treadle.Run(toy.model(), toy.train_data(), loggers=[Quiet()], precision="fp32")


def test_a_scheduler_object_with_an_undecorated_hook_method_warns(tmp_path: Path) -> None:
    class Schedule(torch.optim.lr_scheduler.LambdaLR):
        def on_step_end(self) -> None:  # meant to listen, but never called
            pass

    def make(optimizer: torch.optim.Optimizer, total_steps: int) -> Schedule:
        return Schedule(optimizer, lambda step: 1.0)

    run = treadle.Run(toy.model(), toy.train_data(), scheduler=make, loggers=[],
                      config={"max_steps": 1, "output_dir": str(tmp_path)})  # fmt: skip
    with pytest.warns(TreadleWarning, match=r"plugin 'scheduler:Schedule': on_step_end"):
        run.fit()


# ------------------------------------------------------------------ early stopping's metric


def test_early_stopping_on_an_eval_metric_without_eval_data_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"early-stopping monitor 'eval/loss' is an evaluation "
                       r"metric that is never logged: no eval_data was given"):  # fmt: skip
        treadle.Run(toy.model(), toy.train_data(), plugins=["early-stopping"])


def test_early_stopping_that_can_act_only_at_the_end_warns() -> None:
    with pytest.warns(TreadleWarning, match=r"early-stopping monitor 'eval/loss' is logged only "
                      r"once, at the end of fit, so it can act only once"):  # fmt: skip
        treadle.Run(toy.model(), toy.train_data(), eval_data=toy.train_data(n=8),
                    plugins=["early-stopping"])  # fmt: skip


def test_early_stopping_is_checked_again_when_fit_changes_the_schedule(tmp_path: Path) -> None:
    run = treadle.Run(toy.model(), toy.train_data(), eval_data=toy.train_data(n=8), loggers=[],
                      plugins=["early-stopping"], checkpoint=None,
                      config={"max_steps": 2, "eval_every": 1, "output_dir": str(tmp_path)})  # fmt: skip
    with pytest.raises(ConfigError, match=r"early-stopping monitor .eval/loss. is never logged"):
        run.fit(eval_every=None, eval_at_end=False)
    assert run.state.step == 0


def test_an_installed_adapter_turns_a_foreign_object_into_a_plugin(fake_dist: Any) -> None:
    fake_dist(
        "acme-adapter",
        {"treadle.adapter": {"acme": "acme_adapter:adapt"}},
        modules={
            "acme_adapter": """
                import treadle

                class ForeignCallback:  # another library's callback: no treadle hooks
                    def on_step_end(self, info):
                        self.steps = getattr(self, "steps", 0) + 1

                class Adapted:
                    def __init__(self, foreign):
                        self.foreign = foreign

                    @treadle.hookimpl
                    def on_step_end(self, run):
                        self.foreign.on_step_end(run.state.step)

                def adapt(obj):
                    return Adapted(obj) if isinstance(obj, ForeignCallback) else None
            """
        },
    )
    import acme_adapter

    foreign = acme_adapter.ForeignCallback()
    run = treadle.Run(
        toy.model(), toy.train_data(), loggers=[], checkpoint=None, plugins=[foreign],
        config=treadle.Config(max_steps=3),
    )  # fmt: skip
    assert "acme:ForeignCallback" in run.plugin_manager.list_name_plugin()[-1][0]
    run.fit()
    assert foreign.steps == 3
    # an object no adapter accepts is still refused, naming the fix
    with pytest.raises(treadle.ConfigError, match="install the treadle adapter package"):
        treadle.Run(toy.model(), toy.train_data(), loggers=[], plugins=[object()])


@pytest.mark.parametrize("twice", ["same object", "defaults"])
def test_a_plugin_passed_twice_is_refused_naming_it(twice: str) -> None:
    class Once:
        @treadle.hookimpl
        def on_step_end(self) -> None:
            pass

    once = Once()
    plugins: list[Any] = [once, once] if twice == "same object" else ["defaults"]
    name = "Once" if twice == "same object" else "defaults"
    with pytest.raises(ConfigError, match=rf"plugin '{name}' .* is part of this run already"):
        treadle.Run(toy.model(), toy.train_data(), loggers=[], checkpoint=None, plugins=plugins)
