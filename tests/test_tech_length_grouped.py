"""``length-grouped-sampler``: HF's grouping, seeded, per-epoch, resumable and sharded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import treadle
from treadle.errors import ConfigError
from treadle.plugins.techniques.length_grouped import (
    LengthGroupedResumableSampler,
    LengthGroupedSampler,
    length_grouped_indices,
)


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Samples of lengths 1..max_len: {"input_ids": (length,), "labels": ()}."""

    def __init__(self, n: int = 96, max_len: int = 24, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(1, max_len + 1, (n,), generator=generator).tolist()
        self.rows = [torch.randint(1, 50, (n,), generator=generator) for n in self.lengths]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.rows[index]
        return {"input_ids": ids, "labels": ids[0] % 3}


class Pooled(nn.Module):
    """Mean of the non-padding embeddings, classified into 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8, padding_idx=0)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = (input_ids != 0).float().unsqueeze(-1)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return {"loss": nn.functional.cross_entropy(self.head(pooled), labels)}


def make_run(tmp_path: Path, *plugins: Any, **config: Any) -> treadle.Run:
    torch.manual_seed(0)
    options = {"batch_size": 4, "max_steps": 10, "log_every": 0, "output_dir": str(tmp_path)}
    return treadle.Run(
        Pooled(),
        Tokens(),
        config=treadle.Config(**{**options, **config}),
        optimizer={"name": "sgd", "lr": 0.1},
        loggers=[],
        plugins=list(plugins),
    )


def loader_of(run: treadle.Run) -> Any:
    return run.provide("make_train_loader", run=run, data=run.train_data)


def batch_lengths(loader: Any) -> list[list[int]]:
    return [(batch["input_ids"] != 0).sum(1).tolist() for batch in loader]


def test_order_is_hf_get_length_grouped_indices() -> None:
    pytest.importorskip("transformers")
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = Tokens(n=200).lengths
    for mult in (None, 3):
        ours = length_grouped_indices(lengths, 4, mult, torch.Generator().manual_seed(5))
        theirs = get_length_grouped_indices(lengths, 4, mult, torch.Generator().manual_seed(5))
        assert ours == theirs


def test_batches_group_similar_lengths_longest_first(tmp_path: Path) -> None:
    data = Tokens()
    grouped = batch_lengths(loader_of(make_run(tmp_path, LengthGroupedSampler(padding=True))))
    assert grouped[0][0] == max(data.lengths)  # an OOM shows at the first step
    assert sorted(i for batch in grouped for i in batch) == sorted(data.lengths)

    def padding(batches: list[list[int]]) -> int:
        return sum(max(b) * len(b) - sum(b) for b in batches)

    # against the kernel's own shuffled batches of the same data (padded by the same collate)
    plain = make_run(tmp_path, LengthGroupedSampler(padding=True))
    shuffled = torch.utils.data.DataLoader(
        data,
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=plain.provide("make_train_loader", run=plain, data=data).collate_fn,
    )
    assert padding(grouped) < padding(batch_lengths(shuffled)) / 3


def test_same_order_under_a_seed_and_new_order_per_epoch(tmp_path: Path) -> None:
    def order(seed: int, epoch: int) -> list[int]:
        run = make_run(tmp_path, LengthGroupedSampler(padding=True), seed=seed)
        sampler = loader_of(run).sampler
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) != order(0, 0)
    assert order(1, 0) != order(0, 0)
    assert sorted(order(0, 1)) == list(range(96))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_take_disjoint_parts_of_each_group(world_size: int) -> None:
    lengths = Tokens(n=95).lengths  # not a multiple of the world size: padded
    batch_size = 4
    shares = [
        list(
            LengthGroupedResumableSampler(
                lengths, batch_size, seed=3, rank=rank, world_size=world_size
            )
        )
        for rank in range(world_size)
    ]
    assert len({len(share) for share in shares}) == 1
    padded = len(shares[0]) * world_size - len(lengths)
    everything = [i for share in shares for i in share]
    assert set(everything) == set(range(len(lengths)))
    assert len(everything) == len(lengths) + padded and padded < world_size
    # at each step the ranks' batches together are one group of the global order
    single = length_grouped_indices(
        lengths, batch_size * world_size, None, torch.Generator().manual_seed(3)
    )
    group = batch_size * world_size
    for step in range(len(lengths) // group):
        together = {
            i for share in shares for i in share[step * batch_size : (step + 1) * batch_size]
        }
        assert together == set(single[step * group : (step + 1) * group])


def test_dataloader_keeps_its_collate_and_batch_size(tmp_path: Path) -> None:
    data = Tokens()

    def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": nn.utils.rnn.pad_sequence([s["input_ids"] for s in samples], True),
            "labels": torch.stack([s["labels"] for s in samples]),
        }

    given = torch.utils.data.DataLoader(data, batch_size=6, shuffle=True, collate_fn=collate)
    run = make_run(tmp_path, LengthGroupedSampler())
    loader = run.provide("make_train_loader", run=run, data=given)
    assert loader.collate_fn is collate and loader.batch_size == 6
    assert batch_lengths(loader)[0][0] == max(data.lengths)


@pytest.mark.timeout(60)
def test_a_resumed_run_sees_the_same_batches(tmp_path: Path) -> None:
    """Stopped mid-epoch (step 7 of 24 per epoch) and resumed: bit-exact weights."""

    def train(out: Path, stop_at: int | None, max_steps: int = 30) -> treadle.Run:
        class Stop:
            @treadle.hookimpl
            def on_step_end(self, run: treadle.Run) -> None:
                if run.state.step == stop_at:
                    run.request_stop("pause", final=False)

        run = make_run(
            out, LengthGroupedSampler(padding=True), Stop(),
            max_steps=max_steps, resume="auto", save_at_end=True,
        )  # fmt: skip
        run.fit()
        return run

    whole = train(tmp_path / "whole", None)
    train(tmp_path / "parts", 7)
    resumed = train(tmp_path / "parts", None)
    assert resumed.state.step == 30
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_lengths_as_list_or_function(tmp_path: Path) -> None:
    data = Tokens()
    by_key = list(loader_of(make_run(tmp_path, LengthGroupedSampler(padding=True))).sampler)
    by_list = LengthGroupedSampler(lengths=data.lengths, padding=True)
    by_function = LengthGroupedSampler(lengths=lambda s: len(s["input_ids"]), padding=True)
    assert list(loader_of(make_run(tmp_path, by_list)).sampler) == by_key
    assert list(loader_of(make_run(tmp_path, by_function)).sampler) == by_key
    reversed_ = LengthGroupedSampler(lengths=[24 - n for n in data.lengths], padding=True)
    assert list(loader_of(make_run(tmp_path, reversed_)).sampler) != by_key


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="one length per sample"):
        loader_of(make_run(tmp_path, LengthGroupedSampler(lengths=[1, 2, 3])))
    with pytest.raises(ConfigError, match="has no item 'tokens'"):
        loader_of(make_run(tmp_path, LengthGroupedSampler(lengths="tokens")))
    with pytest.raises(ConfigError, match="megabatch_mult"):
        LengthGroupedSampler(megabatch_mult=0)
    run = make_run(tmp_path, LengthGroupedSampler())
    with pytest.raises(ConfigError, match="map-style Dataset"):
        run.provide("make_train_loader", run=run, data=[{"input_ids": torch.ones(2, 3)}])


def test_found_by_name(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"name": "length-grouped-sampler", "padding": True})
    assert isinstance(loader_of(run).sampler, LengthGroupedResumableSampler)
    run.fit()
    assert run.state.step == 10
