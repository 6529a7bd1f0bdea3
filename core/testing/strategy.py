"""The strategy conformance suite.

Any strategy, first-party or a third party's, checks itself against the same suite::

    from treadle.testing import StrategyConformance

    class TestMyStrategy(StrategyConformance):      # pytest collects it
        strategy = functools.partial(MyStrategy, device="cpu")

or calls the checks one by one: :func:`check_loss_parity`, :func:`check_checkpoint_roundtrip`,
:func:`check_agreed_stop`, :func:`check_no_sync`, :func:`check_eval_gather`. Each starts
``world_size`` fresh Python processes on this machine with
:func:`~treadle.testing.run_distributed` (a process group over 127.0.0.1, gloo by default),
trains or evaluates a tiny model in them and compares the result with what the strategy
promises: the weights of a one-process run with the same global batch, a resumed run that ends
where an uninterrupted one does, ranks that stop together, gradients that are not synchronised
inside ``no_sync``, evaluation and prediction that see each sample once and return every
rank's outputs in the data set's order.

A strategy is given as a class or ``functools.partial`` importable by name (the processes
import it), an entry-point name, or a ``{"name": ..., **options}`` mapping. Options must be
JSON values, since they travel to the processes as JSON.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from treadle.hookspecs import hookimpl
from treadle.testing.models import _adamw, _model, tiny_data
from treadle.testing.processes import _import, _import_path, run_distributed

__all__ = [
    "StrategyConformance",
    "check_agreed_stop",
    "check_checkpoint_roundtrip",
    "check_eval_gather",
    "check_loss_parity",
    "check_no_sync",
]

#: What distributed runs are compared with: one process on CPU.
REFERENCE: dict[str, Any] = {"name": "single", "device": "cpu"}


# ---------------------------------------------------------------------- specs


def _portable(spec: Any) -> Any:
    """A strategy/optimizer/... spec as JSON, to rebuild in the worker processes."""
    if spec is None or isinstance(spec, str | bool | int | float):
        return spec
    if isinstance(spec, Mapping):
        return {"mapping": dict(spec)}
    if isinstance(spec, functools.partial):
        return {
            "factory": _import_path(spec.func),
            "args": list(spec.args),
            "kwargs": dict(spec.keywords),
        }
    if callable(spec):
        return {"factory": _import_path(spec), "args": [], "kwargs": {}}
    raise TypeError(
        f"cannot send {spec!r} to the worker processes: give a name, a mapping, or a class, "
        "function or functools.partial defined at the top level of an importable module"
    )


def _rebuild(spec: Any, *, call: bool) -> Any:
    """The inverse of ``_portable``; factories are called (components) or not (optimizers)."""
    if isinstance(spec, str) and ":" in spec:
        spec = {"factory": spec, "args": [], "kwargs": {}}
    if not isinstance(spec, dict):
        return spec
    if "mapping" in spec:
        return spec["mapping"]
    factory = functools.partial(_import(spec["factory"]), *spec["args"], **spec["kwargs"])
    return factory() if call else factory


def _make_run(
    strategy: Any,
    *,
    output_dir: str,
    max_steps: int,
    batch_size: int,
    grad_accum_steps: int,
    model_seed: int = 0,
    checkpoint: Any = None,
    optimizer: Any = None,
    precision: Any = None,
    resume: str | None = None,
    save_at_end: bool = False,
    plugins: Sequence[Any] = (),
) -> Any:
    from torch.utils.data import DataLoader

    from treadle.config import Config
    from treadle.run import Run

    options: dict[str, Any] = {}
    if checkpoint is not None:
        options["checkpoint"] = _rebuild(checkpoint, call=True)
    if precision is not None:
        options["precision"] = _rebuild(precision, call=True)
    config = Config(
        max_steps=max_steps,
        grad_accum_steps=grad_accum_steps,
        log_every=2,
        seed=0,
        output_dir=output_dir,
        resume=resume,
        save_at_end=save_at_end,
        eval_at_end=False,
    )
    return Run(
        _model(model_seed),
        train_data=DataLoader(tiny_data(), batch_size=batch_size, shuffle=True),
        config=config,
        strategy=_rebuild(strategy, call=True),
        optimizer=_rebuild(optimizer, call=False) if optimizer is not None else _adamw,
        loggers=[],
        plugins=list(plugins),
        **options,
    )


class _Record:
    """Remembers the last logged training loss, the step a fit began at, and stop reasons."""

    def __init__(self) -> None:
        self.loss: float | None = None
        self.begin_step: int | None = None

    @hookimpl
    def on_fit_begin(self, run: Any) -> None:
        self.begin_step = run.state.step

    @hookimpl
    def on_log(self, metrics: Mapping[str, float]) -> None:
        if "loss" in metrics:
            self.loss = float(metrics["loss"])


class _RequestAt:
    """Asks for a stop or a save on one rank only, after one step."""

    def __init__(self, rank: int, step: int, what: str) -> None:
        self.rank, self.step, self.what = rank, step, what

    @hookimpl
    def on_step_end(self, run: Any) -> None:
        if run.strategy.rank == self.rank and run.state.step == self.step:
            if self.what == "stop":
                run.request_stop(f"conformance: stop asked on rank {self.rank}")
            else:
                run.request_save()


def _weights(run: Any) -> dict[str, torch.Tensor]:
    """The full weights as the strategy lays them out (complete on the main process)."""
    state = run.strategy.model_state_dict(run.wrapped_model)
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


# ---------------------------------------------------------------------- workers


def _train_worker(strategy: Any, settings: dict[str, Any]) -> dict[str, Any]:
    record = _Record()
    with _make_run(strategy, plugins=[record], **settings) as run:
        run.fit()
        weights = _weights(run)
        return {
            "weights": weights if run.is_main_process else {},
            "step": run.state.step,
            "loss": record.loss,
            "world_size": run.strategy.world_size,
        }


def _roundtrip_worker(
    strategy: Any, settings: dict[str, Any], root: str, steps: int, stop_at: int
) -> dict[str, Any]:
    with _make_run(strategy, output_dir=f"{root}/whole", max_steps=steps, **settings) as run:
        run.fit()
        whole = _weights(run)
    with _make_run(
        strategy, output_dir=f"{root}/parts", max_steps=stop_at, save_at_end=True, **settings
    ) as run:
        run.fit()
    record = _Record()
    # Other initial weights: only the checkpoint can make the resumed run right.
    with _make_run(
        strategy,
        output_dir=f"{root}/parts",
        max_steps=steps,
        resume="auto",
        model_seed=1,
        plugins=[record],
        **settings,
    ) as run:
        run.fit()
        resumed = _weights(run)
        main = run.is_main_process
    return {
        "whole": whole if main else {},
        "resumed": resumed if main else {},
        "begin_step": record.begin_step,
    }


def _stop_worker(
    strategy: Any, settings: dict[str, Any], stop_rank: int, stop_step: int, save_rank: int
) -> dict[str, Any]:
    plugins = [_RequestAt(stop_rank, stop_step, "stop"), _RequestAt(save_rank, 1, "save")]
    with _make_run(strategy, plugins=plugins, **settings) as run:
        run.fit()
        saved = sorted(p.name for p in (run.output_dir / "checkpoints").glob("step-*"))
        return {"step": run.state.step, "reason": run.state.stop_reason, "saved": saved}


def _no_sync_worker(strategy: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """One accumulation window by hand: a backward inside ``no_sync``, then a synced one."""
    run = _make_run(strategy, max_steps=1, **settings)
    try:
        reference = copy.deepcopy(run.model)
        run.setup()
        run.setup_optimizer()
        strategy_ = run.strategy
        model = run.wrapped_model
        rank, world = strategy_.rank, strategy_.world_size
        data = tiny_data()
        size = settings["batch_size"]

        def batch(r: int, micro: int) -> dict[str, torch.Tensor]:
            start = (micro * world + r) * size
            rows = [data[i] for i in range(start, start + size)]
            return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}

        with strategy_.no_sync(model):
            loss = model(**strategy_.to_device(batch(rank, 0)))["loss"]
            strategy_.backward(loss)
        inside = _full_grads(strategy_, model)
        loss = model(**strategy_.to_device(batch(rank, 1)))["loss"]
        strategy_.backward(loss)
        after = _full_grads(strategy_, model)
        # What the synchronised window must hold: the rank-mean of each micro-batch's gradient,
        # summed over the window (the kernel divides by the window length afterwards).
        for micro in range(2):
            for r in range(world):
                (reference(**batch(r, micro))["loss"] / world).backward()
        expected = {
            name: p.grad.detach().clone()
            for name, p in reference.named_parameters()
            if p.grad is not None
        }
        return {"inside": inside, "after": after, "expected": expected}
    finally:
        run.close()


class _EvalRecord:
    """The rows every evaluation batch had when the hooks saw it, and compute_metrics' labels;
    ``predict_step`` returns each batch's labels."""

    def __init__(self) -> None:
        self.rows = 0
        self.labels: torch.Tensor | None = None

    @hookimpl
    def on_eval_step_end(self, batch: Mapping[str, torch.Tensor]) -> None:
        self.rows += len(batch["y"])

    @hookimpl
    def compute_metrics(self, labels: torch.Tensor) -> dict[str, float]:
        self.labels = labels
        return {}

    @hookimpl
    def predict_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": batch["y"]}


def _eval_worker(strategy: Any, output_dir: str, length: int, batch_size: int) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    record = _EvalRecord()
    with _make_run(
        strategy, output_dir=output_dir, max_steps=1, batch_size=batch_size,
        grad_accum_steps=1, plugins=[record],
    ) as run:  # fmt: skip
        data = DataLoader(tiny_data(length), batch_size=batch_size)
        loss = run.evaluate(data)["eval/loss"]
        predicted = [batch["y"] for batch in run.predict(data)]
    return {"loss": loss, "rows": record.rows, "labels": record.labels, "predicted": predicted}


def _full_grads(strategy: Any, model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Each parameter's gradient as this rank sees it, gathered whole if sharded."""
    grads: dict[str, torch.Tensor | None] = {}
    for name, param in strategy.unwrap_model(model).named_parameters():
        grad = param.grad
        if grad is not None and hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()  # a collective: every rank visits parameters alike
        grads[name] = None if grad is None else grad.detach().to("cpu", copy=True)
    return grads


# ---------------------------------------------------------------------- the checks


def _settings(
    per_device_batch: int,
    grad_accum_steps: int,
    steps: int,
    optimizer: Any,
    precision: Any,
    checkpoint: Any = None,
    output_dir: str = "",
) -> dict[str, Any]:
    return {
        "batch_size": per_device_batch,
        "grad_accum_steps": grad_accum_steps,
        "max_steps": steps,
        "optimizer": _portable(optimizer),
        "precision": _portable(precision),
        "checkpoint": _portable(checkpoint),
        "output_dir": output_dir,
    }


@contextlib.contextmanager
def _scratch() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="treadle-conformance-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _compare(
    actual: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    atol: float,
    rtol: float,
    what: str,
) -> float:
    """Largest absolute difference; AssertionError naming the worst tensor beyond tolerance."""
    if set(actual) != set(expected):
        raise AssertionError(
            f"{what}: different names: only in the result {sorted(set(actual) - set(expected))}"
            f", only in the reference {sorted(set(expected) - set(actual))}"
        )
    worst = 0.0
    for name in sorted(expected):
        a, e = actual[name].double(), expected[name].double()
        if a.shape != e.shape:
            raise AssertionError(f"{what}: {name} has shape {tuple(a.shape)}, not {tuple(e.shape)}")
        diff = float((a - e).abs().max()) if a.numel() else 0.0
        worst = max(worst, diff)
        if not torch.allclose(a, e, atol=atol, rtol=rtol):
            raise AssertionError(
                f"{what}: {name} differs by up to {diff:.3g} "
                f"(tolerance atol={atol:g}, rtol={rtol:g})"
            )
    return worst


def check_loss_parity(
    strategy: Any,
    *,
    world_size: int = 2,
    per_device_batch: int = 4,
    grad_accum_steps: int = 2,
    steps: int = 6,
    reference: Any = REFERENCE,
    optimizer: Any = None,
    precision: Any = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    timeout: float = 180.0,
) -> dict[str, Any]:
    """``strategy`` on ``world_size`` processes trains like one process with the same global batch.

    The reference (one process, this one) sees batches of ``per_device_batch * world_size``
    rows; the strategy's ranks see ``per_device_batch`` rows each, sharded from the same
    seeded order, with ``grad_accum_steps`` micro-batches per step (so ``no_sync`` is used)
    and enough steps to cross an epoch (so the order is reshuffled). The final weights must
    agree within ``atol``/``rtol`` (float32 sums in another order), every rank must log the
    same training loss (the mean over ranks), and it must match the reference's.

    Returns:
        ``{"max_abs_diff": ..., "loss": ..., "reference_loss": ...}``.
    """
    with _scratch() as root:
        settings = _settings(per_device_batch, grad_accum_steps, steps, optimizer, precision)
        single = _train_worker(
            _portable(reference),
            {
                **settings,
                "batch_size": per_device_batch * world_size,
                "output_dir": f"{root}/reference",
            },
        )
        results = run_distributed(
            _train_worker,
            _portable(strategy),
            {**settings, "output_dir": f"{root}/distributed"},
            world_size=world_size,
            timeout=timeout,
        )
    for rank, result in enumerate(results):
        if result["world_size"] != world_size:
            raise AssertionError(
                f"rank {rank}: the strategy reports world size {result['world_size']}, "
                f"not {world_size}"
            )
        if result["step"] != steps:
            raise AssertionError(f"rank {rank} stopped at step {result['step']}, not {steps}")
    losses = [result["loss"] for result in results]
    if len(set(losses)) != 1:
        raise AssertionError(f"ranks logged different training losses: {losses}")
    diff = _compare(
        results[0]["weights"], single["weights"], atol=atol, rtol=rtol, what="final weights"
    )
    if not _close(losses[0], single["loss"], atol=atol, rtol=rtol):
        raise AssertionError(
            f"logged training loss {losses[0]} differs from the reference's {single['loss']}"
        )
    return {"max_abs_diff": diff, "loss": losses[0], "reference_loss": single["loss"]}


def _close(a: float | None, b: float | None, *, atol: float, rtol: float) -> bool:
    return a is not None and b is not None and abs(a - b) <= atol + rtol * abs(b)


def check_checkpoint_roundtrip(
    strategy: Any,
    *,
    checkpoint: Any = None,
    world_size: int = 2,
    per_device_batch: int = 4,
    grad_accum_steps: int = 2,
    steps: int = 6,
    stop_at: int = 3,
    optimizer: Any = None,
    precision: Any = None,
    atol: float = 0.0,
    timeout: float = 180.0,
) -> dict[str, Any]:
    """Save at ``stop_at`` (mid-epoch), resume with the same strategy: the same final weights.

    In the same processes: an uninterrupted run of ``steps`` steps; a run that stops and
    saves at ``stop_at``; a run built from other initial weights that resumes from that
    checkpoint and trains to ``steps``. The resumed run must begin at ``stop_at`` and end
    with the uninterrupted run's weights: exactly by default (``atol=0``), as on CPU a
    resumed run continues bit for bit.

    Args:
        checkpoint: the checkpoint format (a name, mapping or factory); None for the run's
            default.
    """
    with _scratch() as root:
        settings = _settings(
            per_device_batch, grad_accum_steps, steps, optimizer, precision, checkpoint
        )
        del settings["max_steps"], settings["output_dir"]
        results = run_distributed(
            _roundtrip_worker,
            _portable(strategy),
            settings,
            root,
            steps,
            stop_at,
            world_size=world_size,
            timeout=timeout,
        )
    for rank, result in enumerate(results):
        if result["begin_step"] != stop_at:
            raise AssertionError(
                f"rank {rank}: the resumed run began at step {result['begin_step']}, "
                f"not at the checkpoint's step {stop_at}"
            )
    diff = _compare(
        results[0]["resumed"],
        results[0]["whole"],
        atol=atol,
        rtol=0.0,
        what="resumed run vs uninterrupted run",
    )
    return {"max_abs_diff": diff}


def check_agreed_stop(
    strategy: Any,
    *,
    world_size: int = 2,
    stop_rank: int = 1,
    stop_step: int = 2,
    save_rank: int = 0,
    checkpoint: Any = None,
    optimizer: Any = None,
    precision: Any = None,
    timeout: float = 180.0,
) -> dict[str, Any]:
    """A stop asked for on one rank stops every rank at that step; a save asked for on
    another rank (after step 1) is written by all.
    """
    with _scratch() as root:
        settings = _settings(4, 1, stop_step + 4, optimizer, precision, checkpoint, root)
        results = run_distributed(
            _stop_worker,
            _portable(strategy),
            settings,
            stop_rank,
            stop_step,
            save_rank,
            world_size=world_size,
            timeout=timeout,
        )
    steps = [result["step"] for result in results]
    if steps != [stop_step] * world_size:
        raise AssertionError(f"ranks stopped at steps {steps}; all should stop at {stop_step}")
    reason = results[stop_rank]["reason"]
    if not (reason or "").startswith("conformance: stop"):
        raise AssertionError(f"rank {stop_rank} stopped for {reason!r}, not for its request")
    if "step-000001" not in results[0]["saved"]:
        raise AssertionError(
            f"the save asked for on rank {save_rank} after step 1 was not written: "
            f"checkpoints {results[0]['saved']}"
        )
    return {"steps": steps, "reasons": [result["reason"] for result in results]}


def check_no_sync(
    strategy: Any,
    *,
    world_size: int = 2,
    per_device_batch: int = 4,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    timeout: float = 180.0,
) -> None:
    """Inside ``no_sync`` gradients are not synchronised; the next backward synchronises all.

    Each rank back-propagates a different micro-batch inside ``strategy.no_sync(model)``:
    afterwards the ranks must not all hold the same gradient (it was not averaged; a
    sharded strategy may hold none yet). Then one more micro-batch each, outside: every rank
    must hold the average over ranks of both micro-batches' gradients, which a copy of the
    model computes in one process.
    """
    with _scratch() as root:
        settings = _settings(per_device_batch, 1, 1, None, None, output_dir=root)
        del settings["max_steps"]
        results = run_distributed(
            _no_sync_worker,
            _portable(strategy),
            settings,
            world_size=world_size,
            timeout=timeout,
        )
    for name in results[0]["inside"]:
        grads = [result["inside"][name] for result in results]
        if all(g is not None for g in grads) and all(torch.equal(g, grads[0]) for g in grads):
            raise AssertionError(
                f"inside no_sync, {name}'s gradient is the same on every rank although the "
                "ranks saw different data: it was synchronised"
            )
    for rank, result in enumerate(results):
        after = {k: v for k, v in result["after"].items() if v is not None}
        _compare(
            after,
            result["expected"],
            atol=atol,
            rtol=rtol,
            what=f"rank {rank}: gradients after the window's synchronised backward",
        )


def check_eval_gather(
    strategy: Any,
    *,
    world_size: int = 2,
    length: int = 13,
    batch_size: int = 3,
    reference: Any = REFERENCE,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    timeout: float = 180.0,
) -> dict[str, Any]:
    """Evaluation and prediction over sharded data see each sample once, in the data set's order.

    Each rank evaluates and predicts its shard of ``length`` rows (by default not a multiple
    of ``world_size``, so the sampler pads the shards, and with ``batch_size`` 3 one rank's
    last batch is padding only). The hooks of all ranks together must see ``length`` rows;
    every rank's ``compute_metrics`` must get every label in the data set's order, and its
    ``predict()`` every rank's outputs in that order, batched as one process batches them; the
    evaluation loss must be the reference's (one process).

    Returns:
        ``{"loss": ..., "reference_loss": ...}``.
    """
    with _scratch() as root:
        single = _eval_worker(_portable(reference), f"{root}/reference", length, batch_size)
        results = run_distributed(
            _eval_worker,
            _portable(strategy),
            f"{root}/distributed",
            length,
            batch_size,
            world_size=world_size,
            timeout=timeout,
        )
    rows = [result["rows"] for result in results]
    if sum(rows) != length:
        raise AssertionError(
            f"the ranks' evaluation hooks saw {rows} rows, {sum(rows)} in all, for {length} "
            "samples: the sampler's padding must be cut off (each sample seen once)"
        )
    labels = single["labels"]
    for rank, result in enumerate(results):
        seen = result["labels"]
        if seen is None or not torch.equal(seen, labels):
            raise AssertionError(
                f"rank {rank}: compute_metrics got labels {seen}, not every rank's, once each, in "
                f"the data set's order: {labels}"
            )
        if [len(y) for y in result["predicted"]] != [len(y) for y in single["predicted"]] or (
            not torch.equal(torch.cat(result["predicted"]), labels)
        ):
            raise AssertionError(
                f"rank {rank}: predict() returned {result['predicted']}, not every rank's outputs "
                f"in the data set's order, batched as one process has them: {single['predicted']}"
            )
        if not _close(result["loss"], single["loss"], atol=atol, rtol=rtol):
            raise AssertionError(
                f"rank {rank}: evaluation loss {result['loss']} differs from the reference's "
                f"{single['loss']}"
            )
    return {"loss": results[0]["loss"], "reference_loss": single["loss"]}


class StrategyConformance:
    """Subclass it in a test module to run every check against a strategy::

        class TestMyStrategy(StrategyConformance):
            strategy = functools.partial(MyStrategy, device="cpu")
            checkpoint = "safetensors"         # for the round trip; None: the run's default

    Class attributes tune the checks (tolerances for strategies that reduce in another
    precision). A check a strategy does not support can be skipped by overriding its method.
    """

    strategy: ClassVar[Any] = None
    checkpoint: ClassVar[Any] = None
    world_size: ClassVar[int] = 2
    atol: ClassVar[float] = 1e-5
    rtol: ClassVar[float] = 1e-4
    roundtrip_atol: ClassVar[float] = 0.0
    timeout: ClassVar[float] = 180.0

    def _strategy(self) -> Any:
        # Read from the class dict: a plain function as a class attribute must not be bound.
        strategy = next(
            k.__dict__["strategy"] for k in type(self).__mro__ if "strategy" in k.__dict__
        )
        if isinstance(strategy, staticmethod):
            strategy = strategy.__func__
        if strategy is None:
            raise AssertionError(f"{type(self).__name__} must set the class attribute 'strategy'")
        return strategy

    def test_loss_parity(self) -> None:
        check_loss_parity(
            self._strategy(),
            world_size=self.world_size,
            atol=self.atol,
            rtol=self.rtol,
            timeout=self.timeout,
        )

    def test_checkpoint_roundtrip(self) -> None:
        check_checkpoint_roundtrip(
            self._strategy(),
            checkpoint=self.checkpoint,
            world_size=self.world_size,
            atol=self.roundtrip_atol,
            timeout=self.timeout,
        )

    def test_agreed_stop(self) -> None:
        check_agreed_stop(
            self._strategy(),
            world_size=self.world_size,
            stop_rank=min(1, self.world_size - 1),
            checkpoint=self.checkpoint,
            timeout=self.timeout,
        )

    def test_no_sync(self) -> None:
        if self.world_size == 1:
            import pytest

            pytest.skip("one process: there is no synchronisation to skip")
        check_no_sync(self._strategy(), world_size=self.world_size, timeout=self.timeout)

    def test_eval_gather(self) -> None:
        check_eval_gather(
            self._strategy(),
            world_size=self.world_size,
            atol=self.atol,
            rtol=self.rtol,
            timeout=self.timeout,
        )
