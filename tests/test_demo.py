"""Tests for ``treadle demo`` (treadle.plugins.demo): the task, the model, the metric, the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from treadle import cli
from treadle.plugins import demo
from treadle.plugins.demo import (
    IGNORE_INDEX,
    VOCAB,
    AdditionDataset,
    Example,
    TinyLM,
    decode,
    encode,
    exact_match_accuracy,
    make_splits,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # The models are tiny: one thread is as fast, and tests sharing a machine do not fight.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- the task


def test_example_text_reverses_only_the_answer() -> None:
    assert Example(123, 456, 3).text == "123+456=9750"  # 579 -> "0579" -> reversed
    assert Example(7, 995, 3).text == "007+995=2001"  # 1002, units digit first
    assert decode(encode("12+=")) == "12+="
    assert set(Example(999, 999, 3).text) <= set(VOCAB)


def test_splits_are_deterministic_and_disjoint_even_when_commuted() -> None:
    train, heldout = make_splits(3, n_train=5_000, n_eval=300)
    again = make_splits(3, n_train=5_000, n_eval=300)
    assert (train, heldout) == again
    assert make_splits(4, n_train=5_000, n_eval=300) != (train, heldout)
    assert len(train) == 5_000 and len(heldout) == 300

    def key(ex: Example) -> tuple[int, int]:
        return (min(ex.a, ex.b), max(ex.a, ex.b))

    train_keys = {key(ex) for ex in train}
    heldout_keys = {key(ex) for ex in heldout}
    assert len(train_keys) == len(train) and len(heldout_keys) == len(heldout)  # no repeats
    assert not train_keys & heldout_keys
    # the held-out set does not depend on how much training data is asked for
    assert make_splits(3, n_train=100, n_eval=300)[1] == heldout


def test_splits_refuse_more_problems_than_exist() -> None:
    with pytest.raises(ValueError, match="distinct problems"):
        make_splits(0, digits=1, n_train=50, n_eval=10)


def test_labels_score_only_the_answer() -> None:
    examples = [Example(123, 456, 3), Example(5, 60, 3)]
    dataset = AdditionDataset(examples)
    assert len(dataset) == 2
    item = dataset[0]
    assert decode(item["input_ids"].tolist()) == "123+456=9750"
    prompt = len(examples[0].prompt)
    assert item["labels"].dtype == torch.long
    assert (item["labels"][:prompt] == IGNORE_INDEX).all()
    assert torch.equal(item["labels"][prompt:], item["input_ids"][prompt:])


# ---------------------------------------------------------------- the model


def test_loss_is_shifted_masked_cross_entropy_and_attention_is_causal() -> None:
    torch.manual_seed(0)
    model = TinyLM(max_len=12, d_model=32, n_heads=4)
    batch = torch.utils.data.default_collate(
        [AdditionDataset(make_splits(0, n_train=8, n_eval=1)[0])[i] for i in range(8)]
    )
    out = model(**batch)
    assert out["logits"].shape == (8, 12, len(VOCAB))
    expected = F.cross_entropy(
        out["logits"][:, :-1].reshape(-1, len(VOCAB)), batch["labels"][:, 1:].reshape(-1)
    )  # the default ignore_index is -100 as well
    torch.testing.assert_close(out["loss"], expected)
    assert model(batch["input_ids"])["loss"] is None
    # changing the last token must not change any earlier position's logits
    changed = batch["input_ids"].clone()
    changed[:, -1] = (changed[:, -1] + 1) % 10
    torch.testing.assert_close(model(changed)["logits"][:, :-1], out["logits"][:, :-1])


def test_tinylm_loss_decreases_with_plain_training() -> None:
    torch.manual_seed(0)
    train, _ = make_splits(0, n_train=2_000, n_eval=10)
    dataset = AdditionDataset(train)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True)
    model = TinyLM(max_len=12, d_model=64, n_heads=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    steps = 0
    while steps < 50:
        for batch in loader:
            loss = model(**batch)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            steps += 1
            if steps == 50:
                break
    # from ln(12) ~ 2.48 (uniform) to the digit distribution and beyond
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


# ---------------------------------------------------------------- the metric


class _Oracle(nn.Module):
    """Emits the true next token after each example's prompt (or a wrong one, if ``off``)."""

    def __init__(self, examples: list[Example], off: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.answers = {ex.prompt: ex.answer for ex in examples}
        self.off = off

    def forward(self, input_ids: torch.Tensor) -> dict[str, Any]:
        assert not self.training, "accuracy must be measured in eval mode"
        logits = torch.zeros(*input_ids.shape, len(VOCAB))
        for row, ids in enumerate(input_ids.tolist()):
            text = decode(ids)
            prompt, done = text[:8], len(text) - 8
            token = (int(self.answers[prompt][done]) + self.off) % 10
            logits[row, -1, token] = 1.0
        return {"logits": logits}


def test_exact_match_accuracy_with_an_oracle() -> None:
    _, heldout = make_splits(0, n_train=10, n_eval=50)
    oracle = _Oracle(heldout)
    assert oracle.training
    assert exact_match_accuracy(oracle, heldout, batch_size=16) == 1.0
    assert oracle.training  # mode restored
    assert exact_match_accuracy(_Oracle(heldout, off=1), heldout) == 0.0
    assert exact_match_accuracy(oracle, []) == 0.0


# ---------------------------------------------------------------- the command


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_main_short_run_writes_logs_and_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert demo.main(["--steps", "60", "--output-dir", str(out), "--threads", "1"]) == 0
    records = _records(out / "metrics.jsonl")
    evals = [r for r in records if "heldout/accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert evals[-1]["heldout/loss"] < evals[0]["heldout/loss"]
    assert any("loss" in r for r in records)
    checkpoint = out / "checkpoints" / "step-000060"
    assert (checkpoint / "model.safetensors").is_file()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("demo done: heldout accuracy")
    assert str(out / "metrics.jsonl") in line and str(checkpoint) in line

    # `treadle plot` on the demo's output writes a PNG that decodes
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (treadle[plot])")
    from matplotlib import image

    assert cli.main(["plot", str(out)]) == 0
    png = Path(capsys.readouterr().out.strip())
    assert png == out / "metrics.png" and png.stat().st_size > 10_000
    assert image.imread(png).shape[:2] == (4 * 260, 800)

    # a rerun through the command line (options after `demo`) starts clean instead of appending
    assert cli.main(["demo", "--steps", "60", "--output-dir", str(out), "--threads", "1"]) == 0
    assert len(_records(out / "metrics.jsonl")) == len(records)


def test_main_refuses_a_directory_it_did_not_make(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    assert demo.main(["--steps", "1", "--output-dir", str(tmp_path)]) == 2
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert "not written by `treadle demo`" in capsys.readouterr().err


def test_main_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        demo.main(["--steps", "0"])
