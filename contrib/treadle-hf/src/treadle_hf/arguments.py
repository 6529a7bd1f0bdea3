"""``TrainingArguments`` → the keyword arguments of ``treadle.Run``.

``from_training_arguments(args)`` reads an HF ``TrainingArguments`` (after its own
``__post_init__``, so HF's derived defaults apply) and returns ``config``, ``strategy``,
``precision``, ``optimizer``, ``scheduler``, ``loggers`` and ``plugins``::

    run = treadle.Run(model=model, train_data=train_ds, eval_data=eval_ds,
                      **treadle_hf.from_training_arguments(args, data_collator=collator))

``FIELDS`` says, for every field of the installed ``TrainingArguments``, what becomes of it:
``"mapped to ..."``, ``"ignored: <why>"`` (no effect on training in treadle, by design) or
``"unsupported: <what to do instead>"``. An unsupported field set to a value other than its
default gives one ``UnsupportedArgumentWarning`` naming it, as does an unsupported value of a
mapped field (``save_strategy="epoch"``, ``report_to="comet_ml"``, ...). A value that cannot be
honoured without changing the training itself (an ``lr_scheduler_type`` treadle lacks, a
fractional ``num_train_epochs``) is a ``treadle.ConfigError``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import treadle
from treadle_hf.data import HFData

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from treadle import Run

__all__ = [
    "FIELDS",
    "LoadBestAtEnd",
    "LogFirstStep",
    "UnsupportedArgumentWarning",
    "fields_table",
    "from_training_arguments",
]


class UnsupportedArgumentWarning(treadle.TreadleWarning):
    """A ``TrainingArguments`` field (or value) that treadle-hf does not carry over."""


# Parameter-name substrings HF's Trainer excludes from weight decay (its patterns "bias",
# "layernorm", "rmsnorm", "(^|.)norm($|.)", "_norm($|.)"); treadle already excludes biases and
# the weights of normalisation layers by type.
HF_NO_DECAY: tuple[str, ...] = ("bias", "layernorm", "rmsnorm", "_norm.", ".norm.")

_M, _I, _U = "mapped to ", "ignored: ", "unsupported: "

#: What becomes of every ``TrainingArguments`` field (transformers 5.x).
FIELDS: dict[str, str] = {
    # --- length, batches, accumulation
    "output_dir": _M + "Config.output_dir (None: 'trainer_output', as HF)",
    "per_device_train_batch_size": _M + "Config.batch_size",
    "per_device_eval_batch_size": _M + "Config.eval_batch_size",
    "num_train_epochs": _M + "Config.max_epochs when max_steps <= 0 (whole numbers only)",
    "max_steps": _M + "Config.max_steps (> 0 overrides num_train_epochs, as HF)",
    "gradient_accumulation_steps": _M + "Config.grad_accum_steps",
    "seed": _M + "Config.seed",
    "full_determinism": _M + "Config.deterministic",
    "dataloader_drop_last": _M + "Config.drop_last",
    "dataloader_num_workers": _M + "Config.num_workers",
    "train_sampling_strategy": _M
    + "Config.shuffle ('random': True, 'sequential': False); 'group_by_length' and "
    "'batch_rebalance' unsupported for now (warning)",
    "ddp_timeout": _M + "Config.collective_timeout_s",
    "remove_unused_columns": _M + "the hf-data plugin (treadle_hf.data.HFData)",
    "label_names": _M + "the hf-data plugin: columns kept besides forward's arguments",
    # --- optimizer and schedule
    "learning_rate": _M + "optimizer lr",
    "optim": _M + "optimizer: adamw_torch → adamw, adamw_torch_fused → adamw (fused=True), sgd, "
    "adagrad, rmsprop; others are a ConfigError",
    "weight_decay": _M + "optimizer weight_decay, with HF's decay groups (no decay for "
    "biases and norm weights)",
    "adam_beta1": _M + "optimizer betas[0]",
    "adam_beta2": _M + "optimizer betas[1]",
    "adam_epsilon": _M + "optimizer eps",
    "lr_scheduler_type": _M
    + "scheduler: linear, cosine, cosine_with_restarts (num_cycles=1), polynomial, "
    "constant, constant_with_warmup, inverse_sqrt, reduce_lr_on_plateau, cosine_with_min_lr, "
    "warmup_stable_decay; others are a ConfigError",
    "lr_scheduler_kwargs": _M + "scheduler options",
    "warmup_steps": _M + "scheduler warmup_steps (a value < 1: warmup_ratio)",
    "max_grad_norm": _M + "the grad-clip plugin (max_norm; 0 or None: no clipping)",
    # --- precision, devices
    "bf16": _M + "precision 'bf16-mixed'",
    "fp16": _M + "precision 'fp16-mixed'",
    "use_cpu": _M + "strategy {'name': 'single', 'device': 'cpu'}",
    # --- logging
    "logging_strategy": _M
    + "Config.log_every ('steps': logging_steps; 'no': 0, treadle then logs once at "
    "the end); 'epoch' unsupported (warning)",
    "logging_steps": _M + "Config.log_every (a value < 1: a fraction of max_steps)",
    "logging_first_step": _M + "the LogFirstStep plugin (a log after step 1)",
    "report_to": _M
    + "loggers: tensorboard, wandb, mlflow (others: warning), always with 'console'",
    "disable_tqdm": _M + "console logger bar=False",
    "skip_memory_metrics": _M + "the memory plugin when False",
    # --- evaluation, checkpoints
    "eval_strategy": _M
    + "Config.eval_every / eval_every_epoch (eval_at_end=False: HF evaluates only on its "
    "cadence)",
    "eval_steps": _M + "Config.eval_every (a value < 1: a fraction of max_steps)",
    "save_strategy": _M
    + "Config.save_every / save_at_end ('steps' saves at the end too, as HF); 'epoch' "
    "and 'best' unsupported (warning)",
    "save_steps": _M + "Config.save_every (a value < 1: a fraction of max_steps)",
    "save_total_limit": _M + "Config.keep_last",
    "load_best_model_at_end": _M + "Config.keep_best=1 and the LoadBestAtEnd plugin",
    "metric_for_best_model": _M + "Config.monitor ('eval_x' → 'eval/x')",
    "greater_is_better": _M + "Config.monitor_mode ('max' / 'min')",
    # --- ignored by design
    "average_tokens_across_devices": _I
    + "with Config(loss_normalization='tokens'), treadle always divides by the scored tokens "
    "of the window over all ranks",
    "logging_nan_inf_filter": _I
    + "treadle logs the mean loss as it is; the numeric-guard plugin handles non-finite losses",
    "include_num_input_tokens_seen": _I + "treadle counts run.state.tokens_seen itself",
    "log_level": _I + "Python logging is configured by the script",
    "log_level_replica": _I + "Python logging is configured by the script",
    "log_on_each_node": _I + "treadle loggers write on the main process only",
    "prediction_loss_only": _I
    + "treadle's eval keeps predictions only when a compute_metrics hook is implemented",
    "dataloader_pin_memory": _I + "loaders built by treadle do not pin memory",
    "dataloader_in_order": _I + "treadle's loaders yield in order",
    "eval_do_concat_batches": _I + "treadle concatenates predictions for compute_metrics",
    "do_train": _I + "read by scripts, not by the HF Trainer",
    "do_eval": _I + "read by scripts, not by the HF Trainer",
    "do_predict": _I + "read by scripts, not by the HF Trainer",
    "local_rank": _I + "set by the launcher; treadle reads the environment",
    "enable_jit_checkpoint": _I + "treadle always saves and stops on SIGTERM",
    "use_cache": _I + "set model.config.use_cache on the model",
    # --- unsupported (for now)
    "optim_args": _U + "pass optimizer options as a dict",
    "optim_target_modules": _U + "GaLore/APOLLO optimizers are not mapped",
    "label_smoothing_factor": _U + "write a compute_loss hook",
    "bf16_full_eval": _U + "evaluation runs in the training precision",
    "fp16_full_eval": _U + "evaluation runs in the training precision",
    "tf32": _U + "set torch.backends.cuda.matmul.allow_tf32 in the script",
    "activation_checkpointing": _U + "call model.gradient_checkpointing_enable()",
    "activation_checkpointing_kwargs": _U + "call model.gradient_checkpointing_enable()",
    "gradient_checkpointing": _U + "call model.gradient_checkpointing_enable()",
    "gradient_checkpointing_kwargs": _U + "call model.gradient_checkpointing_enable(...)",
    "torch_compile": _U + "compile the model in the script",
    "torch_compile_backend": _U + "compile the model in the script",
    "torch_compile_mode": _U + "compile the model in the script",
    "use_liger_kernel": _U + "apply Liger kernels to the model in the script",
    "liger_kernel_config": _U + "apply Liger kernels to the model in the script",
    "neftune_noise_alpha": _U + "for now (a NEFTune plugin is planned)",
    "torch_empty_cache_steps": _U + "no equivalent",
    "auto_find_batch_size": _U + "no equivalent",
    "run_name": _U + "name the run through the logger's options",
    "project": _U + "trackio is not a treadle logger",
    "trackio_space_id": _U + "trackio is not a treadle logger",
    "trackio_bucket_id": _U + "trackio is not a treadle logger",
    "trackio_static_space_id": _U + "trackio is not a treadle logger",
    "eval_delay": _U + "no equivalent",
    "eval_on_start": _U + "call run.evaluate() before run.fit()",
    "eval_use_gather_object": _U + "no equivalent",
    "eval_accumulation_steps": _U + "no equivalent",
    "include_for_metrics": _U + "implement eval_step to return what compute_metrics needs",
    "batch_eval_metrics": _U + "use on_eval_step_end for per-batch metrics",
    "save_only_model": _U + "treadle checkpoints always hold the full training state",
    "save_on_each_node": _U + "no equivalent",
    "push_to_hub": _U + "push an exported folder with huggingface_hub",
    "hub_token": _U + "push an exported folder with huggingface_hub",
    "hub_private_repo": _U + "push an exported folder with huggingface_hub",
    "hub_model_id": _U + "push an exported folder with huggingface_hub",
    "hub_strategy": _U + "push an exported folder with huggingface_hub",
    "hub_always_push": _U + "push an exported folder with huggingface_hub",
    "hub_revision": _U + "push an exported folder with huggingface_hub",
    "ignore_data_skip": _U + "treadle resumes at the exact data position",
    "restore_callback_states_from_checkpoint": _U + "no equivalent",
    "data_seed": _U + "treadle's data order follows Config.seed",
    "accelerator_config": _U + "use strategy='accelerate' with its options",
    "parallelism_config": _U + "choose a strategy (fsdp, deepspeed, ...)",
    "dataloader_persistent_workers": _U + "pass a DataLoader built with it",
    "dataloader_prefetch_factor": _U + "pass a DataLoader built with it",
    "dataloader_multiprocessing_context": _U + "pass a DataLoader built with it",
    "length_column_name": _U + "for now (length grouping is planned)",
    "ddp_find_unused_parameters": _U + "use strategy={'name': 'ddp', ...} options",
    "ddp_bucket_cap_mb": _U + "use strategy={'name': 'ddp', ...} options",
    "ddp_broadcast_buffers": _U + "use strategy={'name': 'ddp', ...} options",
    "ddp_static_graph": _U + "use strategy={'name': 'ddp', ...} options",
    "ddp_backend": _U + "use strategy={'name': 'ddp', ...} options",
    "fsdp": _U + "use strategy='fsdp'",
    "fsdp_config": _U + "use strategy={'name': 'fsdp', ...} options",
    "deepspeed": _U + "use strategy={'name': 'deepspeed', ...}",
    "debug": _U + "no equivalent",
    "resume_from_checkpoint": _U
    + "not read by the HF Trainer either; use Config(resume=...) with a treadle checkpoint",
}


def fields_table() -> str:
    """``FIELDS`` as the Markdown table of the README (one row per field, in field order)."""
    from transformers import TrainingArguments

    rows = ["| `TrainingArguments` field | in treadle |", "|---|---|"]
    for field in dataclasses.fields(TrainingArguments):
        rows.append(f"| `{field.name}` | {FIELDS.get(field.name, 'not listed')} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- plugins


class LogFirstStep:
    """Log the training metrics after the first optimizer step (HF's ``logging_first_step``)."""

    name: ClassVar[str] = "hf-log-first-step"

    @treadle.hookimpl
    def on_step_end(self, run: Run) -> None:
        if run.state.step == 1:
            run.request_log()


class LoadBestAtEnd:
    """Load the weights of the best checkpoint (by ``Config.monitor``) when ``fit`` ends (HF's
    ``load_best_model_at_end``). Needs that step's checkpoint: save on the eval cadence."""

    name: ClassVar[str] = "hf-load-best"

    @treadle.hookimpl
    def on_fit_end(self, run: Run) -> None:
        step = run.state.best_step
        if step is None:
            return
        path = Path(run.config.output_dir) / "checkpoints" / f"step-{step:06d}"
        if not path.is_dir():
            warnings.warn(
                f"load_best_model_at_end: the best step ({step}) has no checkpoint; keeping the "
                "last weights. Make save_steps a multiple of eval_steps.",
                UnsupportedArgumentWarning,
                stacklevel=2,
            )
            return
        treadle.load_weights(run.model, path)


# ----------------------------------------------------------------------------- mapping


def _value(x: Any) -> Any:
    """An HF enum's plain value (``IntervalStrategy.STEPS`` → ``"steps"``)."""
    return getattr(x, "value", x)


def _warn(name: str, value: Any, why: str) -> None:
    warnings.warn(
        f"TrainingArguments.{name} = {value!r} is not supported by treadle-hf and is ignored: "
        f"{why}",
        UnsupportedArgumentWarning,
        stacklevel=4,  # the caller of from_training_arguments
    )


@functools.lru_cache(maxsize=8)
def _reference(cls: type, output_dir: str | None) -> Any:
    """Default arguments of ``cls`` after its ``__post_init__`` (for 'set to non-default')."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(output_dir=output_dir)


def _warn_unsupported(args: TrainingArguments) -> None:
    reference = _reference(type(args), args.output_dir)
    for field in dataclasses.fields(args):
        meaning = FIELDS.get(field.name)
        if meaning is not None and not meaning.startswith(_U):
            continue
        value = getattr(args, field.name)
        if value != getattr(reference, field.name):
            why = meaning[len(_U) :] if meaning is not None else "not known to treadle-hf"
            _warn(field.name, value, why)


def _steps(name: str, value: float, max_steps: int | None) -> int:
    """HF's ``*_steps`` fields: an integer, or a fraction (< 1) of ``max_steps``."""
    if value >= 1:
        return int(value)
    if max_steps is None:
        raise treadle.ConfigError(
            f"TrainingArguments.{name} = {value} is a fraction of max_steps, but max_steps is "
            "not set; give a whole number of steps"
        )
    return math.ceil(max_steps * value)


def _metric_key(metric: str) -> str:
    """HF's metric name (``eval_loss``, ``accuracy``) as treadle logs it (``eval/loss``)."""
    return "eval/" + metric.removeprefix("eval_")


def _config(args: TrainingArguments, eval_data_given: bool) -> dict[str, Any]:
    max_steps = args.max_steps if args.max_steps > 0 else None
    values: dict[str, Any] = {
        "max_steps": max_steps,
        "grad_accum_steps": args.gradient_accumulation_steps,
        "batch_size": args.per_device_train_batch_size,
        "eval_batch_size": args.per_device_eval_batch_size,
        "seed": args.seed,
        "deterministic": bool(args.full_determinism),
        "drop_last": args.dataloader_drop_last,
        "num_workers": args.dataloader_num_workers,
        "output_dir": args.output_dir or "trainer_output",
        "collective_timeout_s": args.ddp_timeout,
    }
    if max_steps is None:
        epochs = float(args.num_train_epochs)
        if not epochs.is_integer() or epochs < 1:
            raise treadle.ConfigError(
                f"TrainingArguments.num_train_epochs = {args.num_train_epochs}: treadle trains "
                "whole epochs; give a whole number, or max_steps"
            )
        values["max_epochs"] = int(epochs)

    sampling = _value(args.train_sampling_strategy)
    values["shuffle"] = sampling != "sequential"
    if sampling not in ("random", "sequential"):
        _warn("train_sampling_strategy", sampling, "for now (treadle samples at random)")

    logging = _value(args.logging_strategy)
    if logging == "steps":
        values["log_every"] = _steps("logging_steps", args.logging_steps, max_steps)
    else:
        values["log_every"] = 0
        if logging == "epoch":
            _warn("logging_strategy", logging, "treadle logs on a step cadence; logs at the end")

    evaluation = _value(args.eval_strategy)
    values["eval_at_end"] = False
    if evaluation != "no" and not eval_data_given:
        raise treadle.ConfigError(
            f"TrainingArguments.eval_strategy = {evaluation!r} needs evaluation data: pass "
            "eval_data to treadle.Run (and eval_data_given=True), or set eval_strategy='no'"
        )
    if evaluation == "steps":
        values["eval_every"] = _steps("eval_steps", args.eval_steps, max_steps)
    elif evaluation == "epoch":
        values["eval_every_epoch"] = True

    saving = _value(args.save_strategy)
    if saving == "no":
        values["save_at_end"] = False
    elif saving == "steps":
        values["save_every"] = _steps("save_steps", args.save_steps, max_steps)
    else:
        _warn("save_strategy", saving, "treadle saves on a step cadence; saves at the end")
    if args.save_total_limit is not None and args.save_total_limit > 0:
        values["keep_last"] = args.save_total_limit

    if args.metric_for_best_model is not None and evaluation != "no":
        values["monitor"] = _metric_key(args.metric_for_best_model)
        values["monitor_mode"] = "max" if args.greater_is_better else "min"
        if args.load_best_model_at_end:
            values["keep_best"] = 1
    return values


def _optimizer(args: TrainingArguments) -> dict[str, Any]:
    optim = _value(args.optim)
    common = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    common["no_decay"] = list(HF_NO_DECAY)
    if optim in ("adamw_torch", "adamw_torch_fused"):
        options = {
            "name": "adamw",
            **common,
            "betas": (args.adam_beta1, args.adam_beta2),
            "eps": args.adam_epsilon,
        }
        if optim == "adamw_torch_fused":
            options["fused"] = True
        return options
    if optim in ("sgd", "adagrad", "rmsprop"):
        return {"name": optim, **common}
    raise treadle.ConfigError(
        f"TrainingArguments.optim = {optim!r} has no treadle equivalent; choose adamw_torch, "
        "adamw_torch_fused, sgd, adagrad or rmsprop, or pass optimizer=... to treadle.Run"
    )


# HF's lr_scheduler_type → treadle's scheduler name, where the two formulas are the same.
_SCHEDULERS = {
    "linear": "linear",
    "cosine": "cosine",
    "cosine_with_restarts": "cosine",
    "polynomial": "polynomial",
    "constant": "constant",
    "constant_with_warmup": "constant-with-warmup",
    "inverse_sqrt": "inverse-sqrt",
    "reduce_lr_on_plateau": "reduce-on-plateau",
    "cosine_with_min_lr": "cosine-with-min-lr",
    "warmup_stable_decay": "warmup-stable-decay",
}


def _scheduler(args: TrainingArguments) -> dict[str, Any]:
    kind = _value(args.lr_scheduler_type)
    name = _SCHEDULERS.get(kind)
    if name is None:
        raise treadle.ConfigError(
            f"TrainingArguments.lr_scheduler_type = {kind!r} has no treadle equivalent; "
            f"supported: {', '.join(_SCHEDULERS)}"
        )
    options = dict(args.lr_scheduler_kwargs or {})
    warmup: dict[str, Any] = {}
    if args.warmup_steps >= 1:
        warmup["warmup_steps"] = int(args.warmup_steps)
    elif args.warmup_steps > 0:
        warmup["warmup_ratio"] = float(args.warmup_steps)
    if kind in ("constant", "reduce_lr_on_plateau"):
        warmup = {}  # HF's get_scheduler gives these two no warmup, whatever warmup_steps says
    if kind == "cosine_with_restarts":
        cycles = options.pop("num_cycles", 1)
        if cycles != 1:
            raise treadle.ConfigError(
                f"lr_scheduler_type='cosine_with_restarts' with num_cycles={cycles}: treadle "
                "has no hard restarts; only num_cycles=1 (a plain cosine) is supported"
            )
    if kind == "reduce_lr_on_plateau":
        options["monitor"] = _metric_key(args.metric_for_best_model or "loss")
    if kind == "warmup_stable_decay" and "num_stable_steps" in options:
        stable = options.pop("num_stable_steps")
        decay = options.get("num_decay_steps", 0)
        total = args.max_steps
        if total <= 0 or warmup.get("warmup_steps", 0) + stable + decay != total:
            raise treadle.ConfigError(
                "lr_scheduler_kwargs num_stable_steps: treadle's warmup-stable-decay holds the "
                "lr until num_decay_steps before max_steps; drop num_stable_steps, or make "
                "warmup + stable + decay steps equal max_steps"
            )
    return {"name": name, **warmup, **options}


def _loggers(args: TrainingArguments) -> list[Any]:
    console: Any = {"name": "console", "bar": False} if args.disable_tqdm else "console"
    loggers: list[Any] = [console]
    report_to = args.report_to
    if isinstance(report_to, str):
        report_to = [] if report_to == "none" else [report_to]
    for name in report_to or ():
        if name in ("tensorboard", "wandb", "mlflow"):
            loggers.append(name)
        else:
            _warn("report_to", name, "no treadle logger of that name (tensorboard, wandb, mlflow)")
    return loggers


def _strategy(args: TrainingArguments) -> Any:
    if args.use_cpu:
        return {"name": "single", "device": "cpu"}
    # the HF Trainer runs DDP by itself under torchrun; so does this mapping
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def from_training_arguments(
    args: TrainingArguments,
    *,
    eval_data_given: bool = True,
    data_collator: Callable[[list[Any]], Any] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``treadle.Run`` that reproduce ``args``.

    Args:
        args: the HF ``TrainingArguments`` (or a subclass: fields it adds are warned about
            when set, as unsupported).
        eval_data_given: whether the run gets ``eval_data``. An ``eval_strategy`` other than
            ``"no"`` needs it (a ``ConfigError`` otherwise, as the HF Trainer raises).
        data_collator: the collator the ``hf-data`` plugin applies to ``datasets.Dataset``
            inputs (HF's ``Trainer(data_collator=...)``); default ``default_data_collator``.

    Returns:
        ``config``, ``strategy``, ``precision``, ``optimizer``, ``scheduler``, ``loggers`` and
        ``plugins``, to pass as ``treadle.Run(model=..., train_data=..., **kwargs)``.

    Raises:
        treadle.ConfigError: a value that cannot be honoured (see ``FIELDS``).
    """
    _warn_unsupported(args)
    precision = "bf16-mixed" if args.bf16 else "fp16-mixed" if args.fp16 else None
    plugins: list[Any] = [
        HFData(
            data_collator,
            remove_unused_columns=args.remove_unused_columns,
            label_names=args.label_names,
        )
    ]
    if args.max_grad_norm:
        plugins.append({"name": "grad-clip", "max_norm": float(args.max_grad_norm)})
    if args.logging_first_step:
        plugins.append(LogFirstStep())
    if args.load_best_model_at_end and eval_data_given:
        plugins.append(LoadBestAtEnd())
    if not args.skip_memory_metrics:
        plugins.append("memory")
    config = _config(args, eval_data_given)
    result: dict[str, Any] = {
        "config": treadle.Config(**config),
        "strategy": _strategy(args),
        "optimizer": _optimizer(args),
        "scheduler": _scheduler(args),
        "loggers": _loggers(args),
        "plugins": plugins,
    }
    if precision is not None:
        result["precision"] = precision
    return result
