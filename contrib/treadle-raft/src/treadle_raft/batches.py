"""Kept (prompt, response) pairs as training micro-batches, with the prompt out of the loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from treadle import ConfigError, LossSum

IGNORE = -100  # the label that the loss skips (prompt tokens and padding)

Pair = tuple[Sequence[int], Sequence[int]]


def micro_batches(
    pairs: Sequence[Pair],
    *,
    steps: int,
    batch_size: int,
    grad_accum_steps: int,
    rank: int,
    world_size: int,
    seed: int,
    pad_token_id: int,
) -> list[dict[str, torch.Tensor]]:
    """This rank's ``steps x grad_accum_steps`` micro-batches over ``pairs``.

    Samples are drawn as passes over ``pairs``, each in a new order from ``seed``, until the
    iteration's ``steps x batch_size`` samples are there. Every global micro-batch (its
    ``batch_size / grad_accum_steps`` samples are the same whatever the number of ranks) is
    cut into ``world_size`` equal parts, one per rank.
    """
    per_rank = _per_rank_rows(batch_size, grad_accum_steps, world_size)
    stream = _sample_stream(len(pairs), steps * batch_size, seed)
    global_rows = batch_size // grad_accum_steps
    batches = []
    for start in range(0, len(stream), global_rows):
        rows = stream[start : start + global_rows]
        mine = rows[rank * per_rank : (rank + 1) * per_rank]
        batches.append(collate([pairs[i] for i in mine], pad_token_id))
    return batches


def _per_rank_rows(batch_size: int, grad_accum_steps: int, world_size: int) -> int:
    if batch_size % (grad_accum_steps * world_size):
        raise ConfigError(
            f"RAFT batch_size = {batch_size} must be a multiple of grad_accum_steps "
            f"({grad_accum_steps}) x world size ({world_size}), so that every rank's "
            "micro-batch has as many samples"
        )
    return batch_size // (grad_accum_steps * world_size)


def _sample_stream(n: int, total: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while len(stream) < total:
        stream.extend(torch.randperm(n, generator=generator).tolist())
    return stream[:total]


def collate(pairs: Sequence[Pair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (prompt and padding are
    ``-100``, so only response tokens are learnt)."""
    length = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE, dtype=torch.long)
    for row, (prompt, response) in enumerate(pairs):
        tokens = [*prompt, *response]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        labels[row, len(prompt) : len(tokens)] = torch.tensor(list(response))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_loss(model: nn.Module, batch: Mapping[str, Any]) -> LossSum:
    """Next-token cross-entropy summed over the labelled tokens, with their count: under
    ``loss_normalization="tokens"`` the kernel divides by the count over the whole window and
    all ranks, so a sharded run learns what a one-process run does."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
    targets = batch["labels"][:, 1:]
    total = functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return LossSum(total, (targets != IGNORE).sum())
