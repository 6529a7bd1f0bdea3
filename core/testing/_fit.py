"""What the in-process suites share: building a fresh component from a suite's class attribute,
a short fit of the tiny model, and the resume check (stop, save, resume: the same weights).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from treadle.hookspecs import hookimpl
from treadle.testing.models import _adamw, _model, tiny_data

__all__ = [
    "check_resume_exact",
    "class_attribute",
    "fresh",
    "make_run",
    "required",
    "scratch",
    "weights",
]


def class_attribute(suite: object, name: str) -> Any:
    """The class attribute ``name`` as written, unbound: a plain function stays a function."""
    for klass in type(suite).__mro__:
        if name in klass.__dict__:
            value = klass.__dict__[name]
            return value.__func__ if isinstance(value, staticmethod) else value
    raise AttributeError(name)


def required(suite: object, name: str) -> Any:
    value = class_attribute(suite, name) if _has(suite, name) else None
    if value is None:
        raise AssertionError(
            f"{type(suite).__name__} must set the class attribute {name!r} (the component "
            "under test: a class or zero-argument factory, an entry-point name, or a "
            "{'name': ..., **options} mapping)"
        )
    return value


def _has(suite: object, name: str) -> bool:
    return any(name in klass.__dict__ for klass in type(suite).__mro__)


def fresh(spec: Any) -> Any:
    """A new component for one run: a name or mapping as it is (the run resolves it anew), a
    class or factory called with no arguments. Never one instance shared by two runs."""
    if spec is None or isinstance(spec, str | Mapping):
        return spec
    if callable(spec):
        return spec()
    raise TypeError(
        f"{spec!r}: give the component as a class or zero-argument factory (a fresh instance "
        "per run), an entry-point name or a {'name': ..., **options} mapping"
    )


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="treadle-conformance-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_run(
    output_dir: Path,
    *,
    max_steps: int = 6,
    model_seed: int = 0,
    resume: str | None = None,
    save_at_end: bool = False,
    log_every: int = 2,
    eval_every: int | None = None,
    components: Mapping[str, Any] | None = None,
) -> Any:
    """A run of the tiny model on CPU: components as ``Run`` takes them (``precision=``,
    ``optimizer=``, ``plugins=`` ...); those not given are quiet defaults (AdamW, no logger)."""
    from torch.utils.data import DataLoader

    from treadle.config import Config
    from treadle.run import Run

    options: dict[str, Any] = {
        "strategy": {"name": "single", "device": "cpu"},
        "optimizer": _adamw,
        "loggers": [],
    }
    options.update(components or {})
    config = Config(
        max_steps=max_steps,
        log_every=log_every,
        eval_every=eval_every,
        seed=0,
        output_dir=str(output_dir),
        resume=resume,
        save_at_end=save_at_end,
        eval_at_end=False,
    )
    loader = DataLoader(tiny_data(), batch_size=8, shuffle=True)
    eval_data = DataLoader(tiny_data(16, seed=7), batch_size=8) if eval_every else None
    return Run(_model(model_seed), train_data=loader, eval_data=eval_data, config=config, **options)


class _BeginStep:
    def __init__(self) -> None:
        self.step: int | None = None

    @hookimpl
    def on_fit_begin(self, run: Any) -> None:
        self.step = run.state.step


class _StopAndSaveAt:
    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_step_end(self, run: Any) -> None:
        if run.state.step == self.step:
            run.request_save()
            run.request_stop("conformance: stop to resume", final=False)


def weights(run: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}


def check_resume_exact(
    components: Callable[[], Mapping[str, Any]],
    *,
    steps: int = 6,
    stop_at: int = 3,
    eval_every: int | None = 2,
) -> None:
    """Train ``steps`` steps; stop at ``stop_at`` and save; resume from other initial weights to
    ``steps``: the resumed run begins at ``stop_at`` and ends with the same weights, bit for bit.

    ``components()`` is called once per run, so that no two runs share an instance.
    """
    with scratch() as root:
        with make_run(
            root / "whole", max_steps=steps, eval_every=eval_every, components=components()
        ) as run:
            run.fit()
            whole = weights(run)
        parts = root / "parts"
        # Stopped by a request, not by a smaller max_steps: a schedule's total_steps is the same.
        stopped = dict(components())
        stopped["plugins"] = [*stopped.get("plugins", []), _StopAndSaveAt(stop_at)]
        with make_run(parts, max_steps=steps, eval_every=eval_every, components=stopped) as run:
            run.fit()
        begin = _BeginStep()
        given = dict(components())
        given["plugins"] = [*given.get("plugins", []), begin]
        with make_run(
            parts,
            max_steps=steps,
            eval_every=eval_every,
            resume="auto",
            model_seed=1,
            components=given,
        ) as run:
            run.fit()
            resumed = weights(run)
    if begin.step != stop_at:
        raise AssertionError(
            f"the resumed run began at step {begin.step}, not at the checkpoint's step {stop_at}"
        )
    for name, tensor in whole.items():
        if not torch.equal(resumed[name], tensor):
            diff = float((resumed[name].double() - tensor.double()).abs().max())
            raise AssertionError(
                f"after resuming at step {stop_at}, {name} differs from the uninterrupted run's "
                f"by up to {diff:.3g}: some state was not saved or not restored"
            )
