"""``TrainingArguments`` → ``treadle.Run``: every field accounted for, warnings for what is not
carried over, HF's decay groups, and the HF Trainer's learning rate at every step."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import lm_batches, tiny_bert_classifier, tiny_gpt2, tiny_t5
from torch.utils.data import Dataset
from treadle_hf.arguments import (
    FIELDS,
    UnsupportedArgumentWarning,
    fields_table,
    from_training_arguments,
)

import treadle

transformers = pytest.importorskip("transformers")
TrainingArguments = transformers.TrainingArguments

README = Path(__file__).resolve().parents[1] / "README.md"


def make_args(tmp_path: Path, **values: Any) -> Any:
    base = {"output_dir": str(tmp_path / "hf"), "report_to": "none", "use_cpu": True}
    return TrainingArguments(**{**base, **values})


def unsupported_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, UnsupportedArgumentWarning)]


# ----------------------------------------------------------------------------- the table


def test_every_training_arguments_field_is_listed() -> None:
    names = [field.name for field in dataclasses.fields(TrainingArguments)]
    missing = [name for name in names if name not in FIELDS]
    assert not missing, f"TrainingArguments fields not in treadle_hf.arguments.FIELDS: {missing}"
    stale = sorted(set(FIELDS) - set(names))
    assert not stale, f"FIELDS lists fields this transformers lacks: {stale}"


def test_every_entry_says_mapped_ignored_or_unsupported() -> None:
    for name, meaning in FIELDS.items():
        assert meaning.startswith(("mapped to ", "ignored: ", "unsupported: ")), name


def test_readme_table_is_generated_from_fields() -> None:
    assert fields_table() in README.read_text(encoding="utf-8"), (
        "README.md's TrainingArguments table is stale: paste treadle_hf.arguments.fields_table()"
    )


# ----------------------------------------------------------------------------- warnings


def test_defaults_give_no_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_training_arguments(make_args(tmp_path), eval_data_given=False)
    assert unsupported_warnings(caught) == []


def test_mapped_fields_set_give_no_warning(tmp_path: Path) -> None:
    args = make_args(
        tmp_path,
        max_steps=20,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        weight_decay=0.1,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        eval_strategy="steps",
        eval_steps=5,
        save_steps=10,
        save_total_limit=2,
        load_best_model_at_end=True,
        logging_steps=5,
        logging_first_step=True,
        seed=7,
        max_grad_norm=0.5,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kwargs = from_training_arguments(args, eval_data_given=True)
    assert unsupported_warnings(caught) == []
    config = kwargs["config"]
    assert (config.max_steps, config.grad_accum_steps, config.batch_size) == (20, 2, 4)
    assert (config.eval_every, config.save_every, config.log_every) == (5, 10, 5)
    assert (config.keep_last, config.keep_best, config.monitor) == (2, 1, "eval/loss")
    assert config.monitor_mode == "min" and config.seed == 7 and not config.eval_at_end
    assert kwargs["scheduler"] == {"name": "cosine", "warmup_ratio": 0.1}
    assert {"name": "grad-clip", "max_norm": 0.5} in kwargs["plugins"]
    assert kwargs["optimizer"]["weight_decay"] == 0.1


def test_each_unsupported_field_set_warns_once_naming_it(tmp_path: Path) -> None:
    args = make_args(tmp_path, neftune_noise_alpha=5.0, torch_empty_cache_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_training_arguments(args, eval_data_given=False)
    messages = unsupported_warnings(caught)
    assert len(messages) == 2, messages
    assert any("neftune_noise_alpha" in m for m in messages)
    assert any("torch_empty_cache_steps" in m for m in messages)


def test_unsupported_value_of_a_mapped_field_warns(tmp_path: Path) -> None:
    args = make_args(tmp_path, train_sampling_strategy="group_by_length", save_strategy="epoch")
    with pytest.warns(UnsupportedArgumentWarning) as caught:
        from_training_arguments(args, eval_data_given=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert any("train_sampling_strategy" in m for m in messages)
    assert any("save_strategy" in m for m in messages)


def test_unsupported_scheduler_is_an_error(tmp_path: Path) -> None:
    args = make_args(
        tmp_path,
        max_steps=10,
        lr_scheduler_type="cosine_warmup_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
    )
    with pytest.raises(treadle.ConfigError, match="cosine_warmup_with_min_lr"):
        from_training_arguments(args, eval_data_given=False)


def test_eval_strategy_without_eval_data_is_an_error(tmp_path: Path) -> None:
    args = make_args(tmp_path, eval_strategy="steps", eval_steps=5)
    with pytest.raises(treadle.ConfigError, match="eval_strategy"):
        from_training_arguments(args, eval_data_given=False)


def test_precision_strategy_and_loggers(tmp_path: Path) -> None:
    kwargs = from_training_arguments(make_args(tmp_path, bf16=True), eval_data_given=False)
    assert kwargs["precision"] == "bf16-mixed"
    assert kwargs["strategy"] == {"name": "single", "device": "cpu"}
    assert kwargs["loggers"] == ["console"]


# ----------------------------------------------------------------------------- decay groups


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_bert_classifier, tiny_t5])
def test_weight_decay_groups_match_the_trainer(tmp_path: Path, build: Any) -> None:
    from transformers import Trainer

    from treadle.plugins.optimizers import adamw

    model = build()
    options = dict(
        from_training_arguments(make_args(tmp_path, weight_decay=0.1), eval_data_given=False)[
            "optimizer"
        ]
    )
    assert options.pop("name") == "adamw"
    options.pop("fused", None)
    optimizer = adamw(model, **options)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    hf_names = set(Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state
    hf_decayed = {id(p) for name, p in model.named_parameters() if name in hf_names}
    assert decayed == hf_decayed


# ----------------------------------------------------------------------------- lr parity


class Rows(Dataset):
    """Token rows as dicts of tensors: what both the Trainer and hf-data collate."""

    def __init__(self, n: int, seq: int = 8) -> None:
        batch = lm_batches(1, seq, batch_size=n)[0]
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


MAX_STEPS, WARMUP, EVAL_STEPS = 12, 3, 3

SCHEDULES: dict[str, dict[str, Any]] = {
    "linear": {},
    "cosine": {},
    "cosine_with_restarts": {},
    "polynomial": {"lr_scheduler_kwargs": {"lr_end": 1e-4, "power": 2.0}},
    "constant": {},
    "constant_with_warmup": {},
    "inverse_sqrt": {},
    "cosine_with_min_lr": {"lr_scheduler_kwargs": {"min_lr": 1e-4}},
    "warmup_stable_decay": {"lr_scheduler_kwargs": {"num_decay_steps": 4, "min_lr_ratio": 0.1}},
    # threshold=1 makes every evaluation "no better", so the lr drops after each one
    "reduce_lr_on_plateau": {
        "lr_scheduler_kwargs": {"threshold": 1.0, "patience": 0, "factor": 0.5},
        "eval_strategy": "steps",
        "eval_steps": EVAL_STEPS,
    },
}


def hf_learning_rates(args: Any, train: Dataset, eval_data: Dataset | None) -> list[float]:
    from transformers import Trainer, TrainerCallback

    seen: list[float] = []

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            seen.append(kw["optimizer"].param_groups[0]["lr"])

    trainer = Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=train,
        eval_dataset=eval_data,
        callbacks=[Record()],
    )
    trainer.train()
    return seen


class RecordLR:
    def __init__(self) -> None:
        self.seen: list[float] = []

    @treadle.hookimpl
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # where HF's on_pre_optimizer_step fires: after clipping, before optimizer.step()
        self.seen.append(optimizer.param_groups[0]["lr"])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_learning_rate_matches_the_trainer_at_every_step(tmp_path: Path, kind: str) -> None:
    values = {
        "max_steps": MAX_STEPS,
        "warmup_steps": WARMUP,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 4,
        "lr_scheduler_type": kind,
        "save_strategy": "no",
        "logging_steps": 100,
        "disable_tqdm": True,
        **SCHEDULES[kind],
    }
    train, evaluation = Rows(8), Rows(4)
    with_eval = values.get("eval_strategy", "no") != "no"
    hf_args = make_args(tmp_path / "hf", **values)
    expected = hf_learning_rates(hf_args, train, evaluation if with_eval else None)

    kwargs = from_training_arguments(
        make_args(tmp_path / "treadle", **values), eval_data_given=with_eval
    )
    recorder = RecordLR()
    kwargs["plugins"].append(recorder)
    kwargs["loggers"] = []
    run = treadle.Run(
        model=tiny_gpt2(),
        train_data=train,
        eval_data=evaluation if with_eval else None,
        checkpoint=None,
        **kwargs,
    )
    run.fit()
    assert len(expected) == MAX_STEPS
    if kind != "constant":  # the comparison is not vacuous: the schedule moves
        assert len(set(expected)) > 2, expected
    assert recorder.seen == expected
