"""The loop fires its hooks in exactly the order documented in ``treadle.hookspecs``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import toy

import treadle
from treadle import hookspecs

EVENTS = sorted(
    name
    for name, value in vars(hookspecs).items()
    if name.startswith("on_") and hasattr(value, "treadle_spec")
)
PROVIDERS = sorted(
    name
    for name, value in vars(hookspecs).items()
    if not name.startswith("on_") and hasattr(value, "treadle_spec")
)


class Recorder:
    """Implements every event and records (hook, epoch, step)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []


def _recording_impl(hook: str) -> Any:
    # every event takes `run`; pluggy passes only the arguments a function names
    def impl(self: Recorder, run: treadle.Run) -> None:
        self.calls.append((hook, run.state.epoch, run.state.step))

    impl.__name__ = hook
    return treadle.hookimpl(impl)


for _hook in EVENTS:
    setattr(Recorder, _hook, _recording_impl(_hook))


def expected_sequence(
    *,
    epochs: int,
    batches: int,
    accum: int,
    log_every: int,
    eval_every: int,
    save_every: int,
    eval_batches: int,
) -> list[tuple[str, int, int]]:
    """The sequence the pseudocode in hookspecs' docstring prescribes, written out by hand."""
    seq: list[tuple[str, int, int]] = []
    step = 0
    last_eval = last_save = -1

    def evaluate(epoch: int) -> None:
        nonlocal last_eval
        seq.append(("on_eval_begin", epoch, step))
        seq.extend([("on_eval_step_end", epoch, step)] * eval_batches)
        seq.extend([("on_eval_end", epoch, step), ("on_log", epoch, step)])
        last_eval = step

    def save(epoch: int) -> None:
        nonlocal last_save
        seq.extend([("on_save_checkpoint", epoch, step), ("on_save_end", epoch, step)])
        last_save = step

    seq.append(("on_fit_begin", 0, 0))
    for epoch in range(epochs):
        seq.append(("on_epoch_begin", epoch, step))
        for window_start in range(0, batches, accum):
            seq.append(("on_step_begin", epoch, step))
            for _ in range(min(accum, batches - window_start)):
                seq += [
                    ("on_micro_step_begin", epoch, step),
                    ("on_before_backward", epoch, step),
                    ("on_after_backward", epoch, step),
                    ("on_micro_step_end", epoch, step),
                ]
            seq += [
                ("on_before_optimizer_step", epoch, step),
                ("on_after_optimizer_step", epoch, step),
            ]
            step += 1
            seq.append(("on_step_end", epoch, step))
            if step % log_every == 0:
                seq.append(("on_log", epoch, step))
            if step % eval_every == 0:
                evaluate(epoch)
            if step % save_every == 0:
                save(epoch)
        seq.append(("on_epoch_end", epoch + 1, step))  # the epoch counter has moved on
    if last_eval != step:
        evaluate(epochs)
    if last_save != step:
        save(epochs)
    seq.append(("on_fit_end", epochs, step))
    return seq


def test_fit_fires_hooks_in_documented_order(tmp_path: Path) -> None:
    recorder = Recorder()
    torch.manual_seed(0)
    train = toy.train_data(n=80, batch_size=8)  # 10 batches per epoch
    run = treadle.Run(
        toy.model(),
        train,
        eval_data=toy.train_data(n=16, batch_size=8),  # 2 eval batches
        config=treadle.Config(
            max_epochs=2,
            grad_accum_steps=2,
            eval_every=3,
            save_every=4,
            log_every=2,
            output_dir=str(tmp_path),
        ),
        loggers=[],
        plugins=[recorder],
    )
    assert recorder.calls == [("on_init_end", 0, 0)]
    recorder.calls.clear()
    run.fit()
    expected = expected_sequence(
        epochs=2, batches=10, accum=2, log_every=2, eval_every=3, save_every=4, eval_batches=2
    )
    assert recorder.calls == expected


def test_uneven_window_and_predict_hooks(tmp_path: Path) -> None:
    recorder = Recorder()
    run = treadle.Run(
        toy.model(),
        toy.train_data(n=24, batch_size=8),  # 3 batches, windows of 2 and 1
        config=treadle.Config(
            max_epochs=1,
            grad_accum_steps=2,
            log_every=0,
            eval_at_end=False,
            save_at_end=False,
            output_dir=str(tmp_path),
        ),
        loggers=[],
        checkpoint=None,
        plugins=[recorder],
    )
    run.fit()
    names = [c[0] for c in recorder.calls]
    assert names.count("on_step_begin") == 2
    assert names.count("on_micro_step_begin") == 3
    assert names[-2:] == ["on_log", "on_fit_end"]  # the unlogged tail is logged at the end
    recorder.calls.clear()
    out = run.predict(toy.train_data(n=16, batch_size=8))
    assert len(out) == 2
    assert [c[0] for c in recorder.calls] == [
        "on_predict_begin",
        "on_predict_step_end",
        "on_predict_step_end",
        "on_predict_end",
    ]


def _docstring_markers() -> list[str]:
    return re.findall(r"# <(\w+)>", hookspecs.__doc__ or "")


def test_docstring_marks_every_hook_and_only_hooks() -> None:
    markers = _docstring_markers()
    assert sorted(set(markers)) == sorted(EVENTS + PROVIDERS)
    assert len(markers) == len(set(markers)), "each hook is marked at exactly one place"


def test_every_hook_has_a_docstring() -> None:
    for name in EVENTS + PROVIDERS:
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name


def test_providers_are_firstresult_and_events_are_not() -> None:
    for name in PROVIDERS:
        assert getattr(hookspecs, name).treadle_spec["firstresult"], name
    for name in EVENTS:
        assert not getattr(hookspecs, name).treadle_spec["firstresult"], name


def test_hf_equivalents_table_lists_existing_hooks() -> None:
    table = (Path(__file__).parents[1] / "docs" / "hooks.md").read_text()
    hf_events = [
        "on_init_end",
        "on_train_begin",
        "on_epoch_begin",
        "on_step_begin",
        "on_substep_end",
        "on_pre_optimizer_step",
        "on_optimizer_step",
        "on_step_end",
        "on_log",
        "on_evaluate",
        "on_prediction_step",
        "on_save",
        "on_epoch_end",
        "on_train_end",
        "on_predict",
    ]
    rows = dict(re.findall(r"^\|\s*`(on_\w+)`\s*\|\s*`(\w+)`", table, flags=re.M))
    assert sorted(rows) == sorted(hf_events)
    for hf, ours in rows.items():
        assert ours in EVENTS, f"{hf} maps to {ours}, which is not a hook"


def test_hook_names_follow_the_grammar() -> None:
    pattern = re.compile(
        r"^on_((\w+)_(begin|end)|(before|after)_\w+|log|exception|save_checkpoint|load_checkpoint)$"
    )
    for name in EVENTS:
        assert pattern.match(name), name
