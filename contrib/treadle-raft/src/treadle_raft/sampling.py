"""K responses to one prompt from the model's ``generate``, reproducibly.

Hugging Face's ``generate`` samples from torch's global random stream. Each prompt gets its
own seed (drawn by the RAFT generator, whose state is in the checkpoint) and is sampled inside
``torch.random.fork_rng``: so a prompt's responses do not depend on which rank samples it or
on what else is in its batch (a sharded run samples what a one-process run does), and the
training run's own random stream (dropout, data order) is left untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from treadle_raft.settings import Generation


def sample_responses(
    model: nn.Module,
    prompt: Sequence[int],
    k: int,
    generation: Generation,
    seed: int,
    device: torch.device,
) -> list[list[int]]:
    """``k`` sampled continuations of ``prompt`` (token ids), each cut after its first EOS."""
    generate = getattr(model, "generate", None)
    if generate is None:
        raise TypeError(
            f"RAFT samples with the model's generate() (Hugging Face), which "
            f"{type(model).__name__} lacks"
        )
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    kwargs = generation.generate_kwargs()
    eos = kwargs.get("eos_token_id", getattr(getattr(model, "config", None), "eos_token_id", None))
    training = model.training
    model.eval()  # no dropout while sampling
    try:
        with _forked_rng(device):
            torch.manual_seed(seed)
            out = generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                num_return_sequences=k,
                **kwargs,
            )
    finally:
        model.train(training)
    continuations = out[:, ids.shape[1] :].tolist()
    return [_cut_after_eos(row, eos) for row in continuations]


def _forked_rng(device: torch.device) -> torch.random.fork_rng:  # type: ignore[valid-type]
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)


def _cut_after_eos(tokens: list[int], eos: int | list[int] | None) -> list[int]:
    """Keep the tokens up to and including the first EOS (the model learns to stop)."""
    stops = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[: index + 1]
    return tokens
