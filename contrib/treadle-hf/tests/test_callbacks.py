"""``TrainerCallback``s run unchanged on treadle (``treadle_hf.callbacks``).

The reference is the HF ``Trainer`` itself, on the same tiny GPT-2 and the same data: the same
events, in the same order and number, with the same ``global_step``, ``epoch`` and arguments;
``EarlyStoppingCallback`` stops at the same step.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_gpt2

import treadle

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

pytestmark = pytest.mark.timeout(240)

EVENTS = (
    "on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
    "on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step",
    "on_step_end", "on_evaluate", "on_predict", "on_save", "on_log", "on_prediction_step",
)  # fmt: skip
KWARGS = ("model", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader")
# 16 training rows in batches of 2: 8 micro-batches, 4 optimizer steps (accumulation 2) an epoch
TRAIN_ROWS, EVAL_ROWS, SEQ = 16, 4, 16


class Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Token rows as a map-style dataset: both the Trainer and treadle batch it themselves."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, 100, (count, SEQ), generator=generator)
        self.rows = [{"input_ids": row, "labels": row.clone()} for row in ids]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


class Recorder(TrainerCallback):
    """Writes down every event: its name, the state's step and epoch, which of the objects HF
    passes were given, and the keys of ``logs``/``metrics``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, float, tuple[str, ...]]] = []
        self.logs: list[dict[str, float]] = []
        self.metrics: list[tuple[str, dict[str, float]]] = []


def _recording(event: str) -> Any:
    def record(self: Recorder, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert isinstance(args, TrainingArguments)
        given = tuple(name for name in KWARGS if kwargs.get(name) is not None)
        self.events.append((event, state.global_step, round(float(state.epoch or 0), 6), given))
        if "logs" in kwargs:
            self.logs.append(dict(kwargs["logs"]))
        if "metrics" in kwargs:
            self.metrics.append((event, dict(kwargs["metrics"])))

    return record


for _event in EVENTS:
    setattr(Recorder, _event, _recording(_event))


def hf_arguments(output_dir: Path, **changes: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "logging_strategy": "steps",
        "logging_steps": 2,
        "eval_strategy": "steps",
        "eval_steps": 3,
        "save_strategy": "steps",
        "save_steps": 3,
        "learning_rate": 1e-3,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    return TrainingArguments(**(options | changes))


def treadle_config(output_dir: Path, **changes: Any) -> treadle.Config:
    """The same run as ``hf_arguments`` in treadle's terms."""
    options: dict[str, Any] = {
        "max_steps": 6,
        "batch_size": 2,
        "eval_batch_size": 2,
        "grad_accum_steps": 2,
        "log_every": 2,
        "eval_every": 3,
        "save_every": 3,
        "seed": 0,
        "output_dir": str(output_dir),
    }
    return treadle.Config(**(options | changes))


def treadle_run(config: treadle.Config, plugins: list[Any], lr: float = 1e-3) -> treadle.Run:
    return treadle.Run(
        tiny_gpt2(),
        Rows(TRAIN_ROWS, seed=1),
        Rows(EVAL_ROWS, seed=2),
        config=config,
        optimizer={"name": "adamw", "lr": lr},
        scheduler={"name": "linear"},
        loggers=[],
        plugins=plugins,
    )


@pytest.fixture(scope="module")
def hf_recorder(tmp_path_factory: pytest.TempPathFactory) -> Recorder:
    """The events the HF ``Trainer`` gives a callback: fit, then predict on the eval rows."""
    recorder = Recorder()
    trainer = Trainer(
        model=tiny_gpt2(),
        args=hf_arguments(tmp_path_factory.mktemp("hf")),
        train_dataset=Rows(TRAIN_ROWS, seed=1),
        eval_dataset=Rows(EVAL_ROWS, seed=2),
        callbacks=[recorder],
    )
    trainer.train()
    trainer.predict(Rows(EVAL_ROWS, seed=2))
    return recorder


def _fit_and_predict(run: treadle.Run) -> None:
    run.fit()
    run.predict(Rows(EVAL_ROWS, seed=2))


# ---------------------------------------------------------------- (a) the same events


@pytest.mark.parametrize("setup", ["config", "args-given", "from-training-arguments"])
def test_a_callback_sees_the_events_the_hf_trainer_gives_it(
    hf_recorder: Recorder, tmp_path: Path, setup: str
) -> None:
    """``config``: the callbacks' args are built from the run's Config; ``args-given``: the
    same ``TrainingArguments`` as the Trainer's, in ``plugins=``; ``from-training-arguments``:
    the whole run from those arguments (``treadle_hf.arguments``)."""
    ours = Recorder()
    if setup == "from-training-arguments":
        from treadle_hf.arguments import from_training_arguments

        args = hf_arguments(tmp_path / "run")
        options = from_training_arguments(args)
        options["plugins"] = [*options["plugins"], args, ours]
        options["loggers"] = []
        run = treadle.Run(tiny_gpt2(), Rows(TRAIN_ROWS, seed=1), Rows(EVAL_ROWS, seed=2), **options)
    else:
        plugins: list[Any] = [ours]
        if setup == "args-given":
            plugins.insert(0, hf_arguments(tmp_path / "args"))
        run = treadle_run(treadle_config(tmp_path / "run"), plugins)
    _fit_and_predict(run)

    # every event, in order and number, with the same step, epoch and objects passed
    assert ours.events == hf_recorder.events
    assert {event for event, *_ in ours.events} == set(EVENTS)

    # the same metrics under the same names, except the training log's extras (README)
    assert [event for event, _ in ours.metrics] == [event for event, _ in hf_recorder.metrics]
    for (_, mine), (_, theirs) in zip(ours.metrics, hf_recorder.metrics, strict=True):
        assert mine.keys() == theirs.keys()
    assert len(ours.logs) == len(hf_recorder.logs)
    for mine, theirs in zip(ours.logs, hf_recorder.logs, strict=True):
        if "loss" in theirs:  # a training log: HF adds grad_norm, treadle its timings
            assert {"loss", "learning_rate", "epoch"} <= mine.keys()
            extras = {"step_time_s", "samples_per_s", "grad_norm"}  # grad_norm: with grad-clip
            assert mine.keys() - extras == theirs.keys() - extras
            assert mine["learning_rate"] == pytest.approx(theirs["learning_rate"])
        else:
            assert mine.keys() == theirs.keys()


def test_the_state_follows_the_run(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            seen.update(
                max_steps=state.max_steps,
                num_train_epochs=state.num_train_epochs,
                logging_steps=state.logging_steps,
                eval_steps=state.eval_steps,
                save_steps=state.save_steps,
                train_batch_size=state.train_batch_size,
                world_zero=state.is_world_process_zero,
                output_dir=args.output_dir,
                model=kwargs["model"],
            )

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            seen["log_history"] = list(state.log_history)

    run = treadle_run(treadle_config(tmp_path / "run"), [Probe()])
    run.add_plugin(hf_arguments(tmp_path / "args"))  # the args the callbacks see, added late
    run.fit()
    assert seen["max_steps"] == 6 and seen["num_train_epochs"] == 2
    assert (seen["logging_steps"], seen["eval_steps"], seen["save_steps"]) == (2, 3, 3)
    assert seen["train_batch_size"] == 2 and seen["world_zero"] is True
    assert seen["output_dir"] == str(tmp_path / "args") and seen["model"] is run.model
    history = seen["log_history"]
    assert [entry["step"] for entry in history] == [2, 3, 4, 6, 6, 6]
    assert "eval_loss" in history[1] and "train_loss" in history[-1]


# ---------------------------------------------------------------- (b) EarlyStoppingCallback


def test_early_stopping_stops_treadle_at_the_trainers_step(tmp_path: Path) -> None:
    # lr=0: the eval loss never changes, so it never improves; patience 2 ends the third eval
    args = hf_arguments(
        tmp_path / "hf",
        max_steps=10,
        eval_steps=1,
        save_steps=1,
        learning_rate=0.0,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
    )
    trainer = Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=Rows(TRAIN_ROWS, seed=1),
        eval_dataset=Rows(EVAL_ROWS, seed=2),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=2)],
    )
    trainer.train()
    assert trainer.state.global_step == 3 < args.max_steps

    config = treadle_config(tmp_path / "treadle", max_steps=10, eval_every=1, save_every=1)
    plugins = [args, EarlyStoppingCallback(early_stopping_patience=2)]
    run = treadle_run(config, plugins, lr=0.0)
    state = run.fit()
    assert state.step == trainer.state.global_step
    assert "EarlyStoppingCallback" in (state.stop_reason or "")


def test_early_stopping_with_arguments_built_from_the_config(tmp_path: Path) -> None:
    # no TrainingArguments given: Config.monitor becomes metric_for_best_model
    config = treadle_config(tmp_path, max_steps=10, eval_every=1, monitor="eval/loss")
    run = treadle_run(config, [EarlyStoppingCallback(early_stopping_patience=2)], lr=0.0)
    assert run.fit().step == 3


def test_early_stopping_counter_survives_resume(tmp_path: Path) -> None:
    config = treadle_config(tmp_path, max_steps=2, eval_every=1, save_every=1, monitor="eval/loss")
    first = EarlyStoppingCallback(early_stopping_patience=3)
    treadle_run(config, [first], lr=0.0).fit()
    assert first.early_stopping_patience_counter == 1

    again = EarlyStoppingCallback(early_stopping_patience=3)
    resumed = treadle_run(config.replace(max_steps=10, resume="auto"), [again], lr=0.0)
    # evals at steps 3 and 4 make 3 without improvement: the same stop as without the pause
    assert resumed.fit().step == 4
    assert again.early_stopping_patience_counter == 3


# ---------------------------------------------------------------- control answers


class Steer(TrainerCallback):
    """Asks for what the run's cadence does not do: a log and an eval at step 1, a save at
    step 2, an eval and a save at the end of epoch 0, a stop at step 5."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == 1:
            control.should_log = control.should_evaluate = True
        if state.global_step == 2:
            control.should_save = True
        if state.global_step == 5:
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 4:
            control.should_evaluate = control.should_save = True


class Witness(TrainerCallback):
    """Called after ``Steer``: sees the flags it set, as in HF's CallbackHandler."""

    def __init__(self) -> None:
        self.saves_asked: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:
            self.saves_asked.append(state.global_step)


def test_control_flags_become_requests_to_the_run(tmp_path: Path) -> None:
    recorder, witness = Recorder(), Witness()
    config = treadle_config(tmp_path, max_steps=20, log_every=0, eval_every=None, save_every=None)
    run = treadle_run(config, [Steer(), witness, recorder])
    state = run.fit()

    happened = [(event, step) for event, step, *_ in recorder.events]
    assert ("on_log", 1) in happened and ("on_evaluate", 1) in happened
    assert ("on_save", 2) in happened and ("on_save", 4) in happened  # 4: the epoch's end
    assert happened.index(("on_epoch_end", 4)) < happened.index(("on_evaluate", 4))
    assert state.step == 5 and "Steer set TrainerControl.should_training_stop" in (
        state.stop_reason or ""
    )
    assert witness.saves_asked == [2]


def test_should_epoch_stop_ends_the_epoch_and_a_stop_at_epoch_end_takes_no_step(
    tmp_path: Path,
) -> None:
    class EpochControl(TrainerCallback):
        """Ends epoch 0 after its first step; stops training at the end of epoch 1."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 1:
                control.should_epoch_stop = True

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step > 1:
                control.should_training_stop = True

    recorder = Recorder()
    config = treadle_config(tmp_path, max_steps=20, eval_every=None, save_every=None)
    state = treadle_run(config, [EpochControl(), recorder]).fit()
    epoch_ends = [step for event, step, *_ in recorder.events if event == "on_epoch_end"]
    steps_per_epoch = epoch_ends[1] - epoch_ends[0]
    assert epoch_ends[0] == 1 and steps_per_epoch > 1  # epoch 0 ended after one step
    assert state.step == epoch_ends[1]  # no step after the stop set in on_epoch_end
    assert "EpochControl set TrainerControl.should_training_stop" in (state.stop_reason or "")


def test_a_callback_that_raises_is_named(tmp_path: Path) -> None:
    class Broken(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            raise RuntimeError("boom")

    run = treadle_run(treadle_config(tmp_path, save_every=None), [Recorder(), Broken()])
    with pytest.raises(treadle.PluginError, match=r"hf-callbacks:Broken.*on_step_end.*boom"):
        run.fit()


# ---------------------------------------------------------------- (c) the adapter


def test_the_adapter_is_installed_and_accepts_callbacks_only(tmp_path: Path) -> None:
    import treadle.registry

    treadle.registry.refresh()
    assert "hf-callbacks" in treadle.registry.entries("adapter")
    config = treadle_config(tmp_path)
    treadle_run(config, [TrainerCallback()])  # accepted: no wrapping in the user's script

    class NotACallback:
        def on_step_end(self, args: Any, state: Any, control: Any) -> None: ...

    with pytest.raises(treadle.ConfigError, match="install the treadle adapter package"):
        treadle_run(config, [NotACallback()])


def test_asking_about_other_objects_does_not_import_transformers() -> None:
    code = (
        "import sys; from treadle_hf.callbacks import adapt; "
        "assert adapt(object()) is None; assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
