"""HF collators on ``datasets.Dataset`` rows of varied lengths, ``load_best_model_at_end``,
``logging_first_step`` and epoch-based runs, each compared with a hand-written loop or with the
HF ``Trainer`` itself.

The collator runs train a tiny model (same seed) on the same collated batches in the same order
as a plain PyTorch loop (SGD, ``grad_accum_steps=2``) and compare per-step losses and final
weights with ``torch.equal``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_bert_mlm, tiny_gpt2, tiny_t5, tiny_tokenizer
from torch import nn
from treadle_hf.arguments import from_training_arguments
from treadle_hf.data import HFData, loader

import treadle

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

LR, STEPS, ACCUM, BATCH = 0.1, 3, 2, 2
ROWS = STEPS * ACCUM * BATCH


class Recorder:
    """Every micro-batch treadle feeds the model, and every optimizer step's loss."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []

    @treadle.hookimpl
    def on_micro_step_begin(self, batch: Any) -> None:
        self.batches.append({k: v.clone() for k, v in batch.items()})

    @treadle.hookimpl
    def on_step_end(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach().clone())


def treadle_fit(model: nn.Module, data: Any, *, plugins: list[Any] = (), **config: Any) -> Recorder:
    recorder = Recorder()
    treadle.Run(
        model=model,
        train_data=data,
        config=treadle.Config(max_steps=STEPS, grad_accum_steps=ACCUM, **config),
        optimizer={"name": "sgd", "lr": LR},
        loggers=[],
        checkpoint=None,
        plugins=[*plugins, recorder],
    ).fit()
    return recorder


def hand_loop(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Accumulate ``ACCUM`` micro-batches, divide the gradients by ``ACCUM``, step SGD."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        total = None
        for batch in batches[step * ACCUM : (step + 1) * ACCUM]:
            loss = model(**batch).loss
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(ACCUM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / ACCUM)
    return losses


def in_order(dataset: Any, collator: Any) -> list[dict[str, torch.Tensor]]:
    """The dataset's rows, in order, ``BATCH`` at a time, through ``collator``."""
    return [
        dict(collator([dataset[i] for i in range(start, start + BATCH)]))
        for start in range(0, STEPS * ACCUM * BATCH, BATCH)
    ]


def assert_same_run(
    ours: nn.Module,
    reference: nn.Module,
    recorder: Recorder,
    batches: list[dict[str, torch.Tensor]],
) -> None:
    """treadle saw ``batches`` in order, and trained ``ours`` exactly as the hand loop trains
    ``reference`` on them."""
    expected = hand_loop(reference, batches)
    assert len(recorder.batches) == len(batches)
    for seen, batch in zip(recorder.batches, batches, strict=True):
        assert seen.keys() == batch.keys()
        for key in batch:
            assert torch.equal(seen[key], batch[key]), key
    assert len(recorder.losses) == len(expected) == STEPS
    for x, y in zip(recorder.losses, expected, strict=True):
        assert torch.equal(x, y), (x, y)
    for (name, p), q in zip(
        ours.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name


def token_rows(n: int, shortest: int, longest: int, *, vocab: int, seed: int) -> list[list[int]]:
    """``n`` rows of ids in ``[2, vocab)`` (0 and 1 are [PAD] and [UNK]/eos), of random lengths
    in ``[shortest, longest]``: the collator has to pad."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(shortest, longest + 1, (1,), generator=generator))
        rows.append(torch.randint(2, vocab, (length,), generator=generator).tolist())
    return rows


def via(way: str, model: nn.Module, dataset: Any, collator: Any) -> Recorder:
    """Train ``model`` on ``dataset`` through the hf-data plugin or through ``loader()``."""
    if way == "hf-data plugin":
        return treadle_fit(
            model, dataset, plugins=[HFData(collator)], batch_size=BATCH, shuffle=False
        )
    return treadle_fit(model, loader(dataset, model, collator=collator, batch_size=BATCH))


WAYS = ["hf-data plugin", "loader()"]


# ----------------------------------------------------------------------------- collators


@pytest.mark.timeout(120)
@pytest.mark.parametrize("way", WAYS)
def test_causal_lm_collator_on_rows_of_varied_lengths(way: str) -> None:
    from transformers import DataCollatorForLanguageModeling

    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    rows = token_rows(ROWS, 3, 9, vocab=vocab, seed=5)
    # an extra column GPT-2's forward does not take: dropped, as by the HF Trainer
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "length": [len(r) for r in rows]})
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    ours, reference = tiny_gpt2(vocab=vocab), tiny_gpt2(vocab=vocab)
    recorder = via(way, ours, dataset, collator)

    batches = in_order(dataset.remove_columns(["length"]), collator)
    for batch in batches:  # the collator's causal-LM labels: the ids, padding unscored
        padding = batch["attention_mask"] == 0
        assert torch.equal(batch["labels"], batch["input_ids"].masked_fill(padding, -100))
    assert any(bool((b["attention_mask"] == 0).any()) for b in batches), "no padding to test"
    assert_same_run(ours, reference, recorder, batches)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("way", WAYS)
def test_masked_lm_collator_with_a_seeded_generator(way: str) -> None:
    """Masking draws random numbers: both runs use a collator with ``seed=``, so its own
    generator draws the same masks for the same batches in the same order (the global torch
    RNG, which treadle seeds and the model may use, plays no part)."""
    from transformers import DataCollatorForLanguageModeling

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    vocab = len(tokenizer)

    def collator() -> Any:
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.3, seed=17)

    dataset = datasets.Dataset.from_dict({"input_ids": token_rows(ROWS, 3, 9, vocab=vocab, seed=6)})
    ours, reference = tiny_bert_mlm(vocab), tiny_bert_mlm(vocab)
    recorder = via(way, ours, dataset, collator())

    batches = in_order(dataset, collator())
    masked = 0
    for start, batch in zip(range(0, ROWS, BATCH), batches, strict=False):
        original = tokenizer.pad({"input_ids": dataset[start : start + BATCH]["input_ids"]})
        original = torch.tensor(original["input_ids"])
        scored = batch["labels"] != -100
        # labels: the original token where a position is masked, -100 everywhere else;
        # unmasked positions (padding included) keep their ids
        assert torch.equal(batch["labels"][scored], original[scored])
        assert torch.equal(batch["input_ids"][~scored], original[~scored])
        assert not scored[original == tokenizer.pad_token_id].any()
        masked += int(scored.sum())
    assert masked > 0
    assert_same_run(ours, reference, recorder, batches)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("way", WAYS)
def test_seq2seq_collator_on_rows_of_varied_lengths(way: str) -> None:
    from transformers import DataCollatorForSeq2Seq

    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    dataset = datasets.Dataset.from_dict(
        {
            "input_ids": token_rows(ROWS, 3, 9, vocab=vocab, seed=7),
            "labels": token_rows(ROWS, 2, 6, vocab=vocab, seed=8),
        }
    )
    ours, reference = tiny_t5(vocab=vocab), tiny_t5(vocab=vocab)
    recorder = via(way, ours, dataset, DataCollatorForSeq2Seq(tokenizer, model=ours))

    batches = in_order(dataset, DataCollatorForSeq2Seq(tokenizer, model=reference))
    assert all("decoder_input_ids" in b for b in batches)  # made from the labels by the model
    assert any(bool((b["labels"] == -100).any()) for b in batches), "no label padding to test"
    assert any(bool((b["attention_mask"] == 0).any()) for b in batches), "no padding to test"
    assert_same_run(ours, reference, recorder, batches)


# ----------------------------------------------------------------------------- TrainingArguments


def make_args(output_dir: Path, **values: Any) -> Any:
    base = {
        "output_dir": str(output_dir),
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "per_device_train_batch_size": BATCH,
        "per_device_eval_batch_size": 4,
        "logging_steps": 100,
    }
    return transformers.TrainingArguments(**{**base, **values})


def lm_dataset(n: int, seq: int = 8, seed: int = 0) -> Any:
    """``n`` causal-LM rows of ``seq`` tokens, as a ``datasets.Dataset`` (default collator)."""
    rows = token_rows(n, seq, seq, vocab=100, seed=seed)
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})


class Logs:
    """Every record treadle logs."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []

    @treadle.hookimpl
    def on_log(self, metrics: Any) -> None:
        self.records.append(dict(metrics))


def args_run(args: Any, train: Any, eval_data: Any = None) -> tuple[treadle.Run, Logs]:
    kwargs = from_training_arguments(args, eval_data_given=eval_data is not None)
    logs = Logs()
    kwargs["plugins"].append(logs)
    kwargs["loggers"] = []
    run = treadle.Run(model=tiny_gpt2(), train_data=train, eval_data=eval_data, **kwargs)
    return run, logs


@pytest.mark.timeout(180)
@pytest.mark.parametrize("limit", [None, 1], ids=["keep-all", "save_total_limit=1"])
def test_load_best_model_at_end_restores_the_best_checkpoint(
    tmp_path: Path, limit: int | None
) -> None:
    # a large Adam lr: the first step helps, the next ones overshoot, so the best eval loss
    # is not the last one
    args = make_args(
        tmp_path / "run",
        max_steps=5,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        eval_strategy="steps",
        eval_steps=1,
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        save_total_limit=limit,  # HF keeps the best checkpoint besides the last ones too
    )
    run, logs = args_run(args, lm_dataset(20), lm_dataset(4, seed=1))
    run.fit()

    evals = {int(r["step"]): r["eval/loss"] for r in logs.records if "eval/loss" in r}
    assert sorted(evals) == [1, 2, 3, 4, 5]
    best = min(evals, key=evals.__getitem__)
    assert best != 5, f"the construction failed: the last eval loss is the best {evals}"
    assert run.state.best_step == best
    assert run.state.best_metric == pytest.approx(evals[best], rel=1e-6)

    checkpoints = tmp_path / "run" / "checkpoints"
    restored = tiny_gpt2(seed=1)
    treadle.load_weights(restored, checkpoints / f"step-{best:06d}")
    kept = sorted(p.name for p in checkpoints.glob("step-*"))
    if limit == 1:
        assert kept == [f"step-{best:06d}", "step-000005"]
    last = tiny_gpt2(seed=1)
    treadle.load_weights(last, checkpoints / "step-000005")
    final = run.model.state_dict()
    for name, value in restored.state_dict().items():
        assert torch.equal(final[name], value), name
    assert any(not torch.equal(final[n], v) for n, v in last.state_dict().items())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("first", [True, False])
def test_logging_first_step_logs_the_training_loss_at_step_1(tmp_path: Path, first: bool) -> None:
    args = make_args(tmp_path / "run", max_steps=3, save_strategy="no", logging_first_step=first)
    run, logs = args_run(args, lm_dataset(8))
    run.fit()
    at_step_1 = [r for r in logs.records if r["step"] == 1 and "loss" in r]
    assert len(at_step_1) == (1 if first else 0), logs.records


# ----------------------------------------------------------------------------- epochs


class CountForwards:
    """Counts ``model.forward`` calls; ``take()`` returns the count since the last take."""

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        model.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


# (rows, gradient_accumulation_steps, micro-batches of each step of one epoch), in batches of 2:
# 10 rows are 5 batches, windows 2 + 2 + 1; 11 rows are 6 batches (the last of 1 row), 4 + 2.
# Neither row count is a multiple of batch * accumulation: each epoch ends with a short window.
EPOCHS = [(10, 2, [2, 2, 1]), (11, 4, [4, 2])]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("rows", "accum", "windows"), EPOCHS, ids=["10x2", "11x4"])
def test_epochs_give_the_trainers_steps_windows_and_learning_rates(
    tmp_path: Path, rows: int, accum: int, windows: list[int]
) -> None:
    from transformers import Trainer, TrainerCallback

    values = {
        "num_train_epochs": 2,
        "gradient_accumulation_steps": accum,
        "learning_rate": 1e-2,
        "warmup_steps": 1,
        "lr_scheduler_type": "linear",
        "save_strategy": "no",
    }
    train = lm_dataset(rows)

    hf_model = tiny_gpt2()
    hf_forwards = CountForwards(hf_model)
    hf_steps: list[tuple[int, float]] = []

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            hf_steps.append((hf_forwards.take(), kw["optimizer"].param_groups[0]["lr"]))

    trainer = Trainer(
        model=hf_model,
        args=make_args(tmp_path / "hf", **values),
        train_dataset=train,
        callbacks=[Record()],
    )
    trainer.train()

    kwargs = from_training_arguments(
        make_args(tmp_path / "treadle", **values), eval_data_given=False
    )
    model = tiny_gpt2()
    forwards = CountForwards(model)
    steps: list[tuple[int, float]] = []

    class RecordLR:
        @treadle.hookimpl
        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            steps.append((forwards.take(), optimizer.param_groups[0]["lr"]))

    kwargs["plugins"].append(RecordLR())
    kwargs["loggers"] = []
    run = treadle.Run(model=model, train_data=train, checkpoint=None, **kwargs)
    run.fit()

    # HF: each epoch's last window is short and still steps; the schedule spans both epochs
    assert [n for n, _ in hf_steps] == windows * 2, hf_steps
    assert trainer.state.global_step == len(hf_steps) and len({lr for _, lr in hf_steps}) > 2
    assert steps == hf_steps
    assert run.state.step == len(hf_steps) and run.state.epoch == 2
