"""The contenders: one training loop each, all doing the same arithmetic on the same data.

Every contender receives the same model, the same in-memory batches and the same optimizer
instance (``AdamW``, built by the worker), takes exactly ``ctx.steps`` optimizer steps and
configures its framework as a careful user would for speed: no per-step logging to disk, no
gradient clipping or learning-rate schedule the bare loop does not have, the progress bar only
where it is the framework's default. Frameworks are imported inside the functions, so a
process pays only for the framework it runs (time to first step and peak RSS count that).

Contenders:
    bare: the floor, the loop a user writes by hand.
    treadle: ``treadle.Run`` with no plugins (``loggers=[]``, ``checkpoint=None``).
    treadle-default: the demo's plugin set: console progress bar, ``jsonl`` logger (every
        ``log_every=50`` steps, the default) and a safetensors checkpoint at the end.
    hf: ``transformers.Trainer`` (its tqdm bar, logging every 50 steps, no saving).
    lightning: ``lightning.pytorch.Trainer`` (its progress bar, no logger, no checkpointing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tests.bench.workloads import Batch

__all__ = ["CONTENDERS", "Context"]

LOG_EVERY = 50  # every framework's training log interval (treadle's and Lightning's default)


@dataclass
class Context:
    """What a contender gets: the workload, built, and where to put files."""

    model: nn.Module
    batches: list[Batch]
    optimizer: torch.optim.Optimizer
    steps: int  # total optimizer steps, warm-up included
    device: torch.device
    precision: str  # "fp32" or "bf16-mixed"
    workdir: str


# ------------------------------------------------------------------ the floor


def bare(ctx: Context) -> None:
    """The hand-written loop: forward, backward, step, ``zero_grad(set_to_none=True)``."""
    model, optimizer, device = ctx.model, ctx.optimizer, ctx.device
    model.train()
    torch.manual_seed(0)  # treadle seeds at set-up; keep the random streams alike
    on_cpu, mixed = device.type == "cpu", ctx.precision == "bf16-mixed"
    step = 0
    while step < ctx.steps:
        for batch in ctx.batches:
            if not on_cpu:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if mixed:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = model(**batch)["loss"]
            else:
                loss = model(**batch)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == ctx.steps:
                break


# ------------------------------------------------------------------ treadle


def _treadle_precision(ctx: Context) -> Any:
    if ctx.precision == "fp32":
        return None
    from treadle.plugins.precision import BF16Mixed

    return BF16Mixed()


def treadle_bare(ctx: Context) -> None:
    """``treadle.Run`` with no plugins at all: the kernel's own cost."""
    import treadle

    config = treadle.Config(max_steps=ctx.steps, output_dir=ctx.workdir)
    run = treadle.Run(
        ctx.model,
        ctx.batches,
        config=config,
        optimizer=ctx.optimizer,
        strategy={"name": "single", "device": str(ctx.device)},
        precision=_treadle_precision(ctx),
        loggers=[],
        checkpoint=None,
    )
    run.fit()


def treadle_default(ctx: Context) -> None:
    """The demo's plugin set: console progress bar, jsonl logger, a checkpoint at the end."""
    import treadle

    config = treadle.Config(max_steps=ctx.steps, output_dir=ctx.workdir, log_every=LOG_EVERY)
    run = treadle.Run(
        ctx.model,
        ctx.batches,
        config=config,
        optimizer=ctx.optimizer,
        strategy={"name": "single", "device": str(ctx.device)},
        precision=_treadle_precision(ctx),
        # the bar a terminal gets (the worker's stderr is a file, where the default is lines)
        loggers=[{"name": "console", "bar": True}, "jsonl"],
        checkpoint="safetensors",
    )
    run.fit()


# ------------------------------------------------------------------ the peers


class _Batches(torch.utils.data.Dataset[Batch]):
    """Ready-made batches as dataset items (with batch size 1 and ``_first`` as collator)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:
        return self.batches[index]


def _first(items: list[Batch]) -> Batch:
    return items[0]


def hf(ctx: Context) -> None:
    """``transformers.Trainer``, with the bare loop's arithmetic (no clipping, constant LR)."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    class InOrder(Trainer):
        # the same batch order as the other contenders (the Trainer shuffles by default)
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return SequentialSampler(range(len(ctx.batches)))

    on_cpu = ctx.device.type == "cpu"
    args = TrainingArguments(
        output_dir=ctx.workdir,
        max_steps=ctx.steps,
        per_device_train_batch_size=1,  # an item is a whole batch
        learning_rate=ctx.optimizer.param_groups[0]["lr"],
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping: the bare loop has none
        logging_steps=LOG_EVERY,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        use_cpu=on_cpu,
        bf16=ctx.precision == "bf16-mixed",
        dataloader_pin_memory=not on_cpu,
        remove_unused_columns=False,
        seed=0,
    )
    trainer = InOrder(
        model=ctx.model,
        args=args,
        train_dataset=_Batches(ctx.batches),
        data_collator=_first,
        optimizers=(ctx.optimizer, None),
    )
    trainer.train()


def lightning(ctx: Context) -> None:
    """``lightning.pytorch.Trainer`` with its defaults, minus logger, checkpoints and summary."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            super().__init__()
            self.model = model
            self._optimizer = optimizer

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            return self.model(**batch)["loss"]  # type: ignore[no-any-return]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self._optimizer

    on_cpu = ctx.device.type == "cpu"
    trainer = pl.Trainer(
        accelerator="cpu" if on_cpu else "gpu",
        devices=1,
        precision="bf16-mixed" if ctx.precision == "bf16-mixed" else "32-true",
        max_steps=ctx.steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=ctx.workdir,
    )
    # a DataLoader without automatic batching: a plain list would be read as a list of loaders
    loader = torch.utils.data.DataLoader(_Batches(ctx.batches), batch_size=None)
    trainer.fit(Module(ctx.model, ctx.optimizer), train_dataloaders=loader)


CONTENDERS: dict[str, Callable[[Context], None]] = {
    "bare": bare,
    "treadle": treadle_bare,
    "treadle-default": treadle_default,
    "hf": hf,
    "lightning": lightning,
}
