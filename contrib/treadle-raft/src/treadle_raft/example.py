"""RAFT on a toy language, on the CPU in well under a minute: ``python -m treadle_raft.example``.

A 2-layer GPT-2 built from its config (random weights, nothing downloaded) first learns a toy
language (sentences of random letters ending in EOS), then RAFT aligns it with a toy reward:
the share of a response's letters that are the chosen letter. The mean reward of the sampled
responses rises from iteration to iteration.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

import treadle
from treadle_raft import Generation, Raft

PAD, BOS, EOS = 0, 1, 2
LETTERS = list(range(3, 13))  # the toy language's alphabet
TARGET = 7  # the letter the reward asks for
VOCAB = 16


def tiny_gpt2(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    """A 2-layer, 64-wide GPT-2 with a 16-token vocabulary (dropout off by default)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return GPT2LMHeadModel(config)


def toy_sentences(n: int, seed: int) -> list[list[int]]:
    """BOS, 3 to 7 letters drawn uniformly, EOS."""
    rng = random.Random(seed)
    return [[BOS, *(rng.choice(LETTERS) for _ in range(rng.randint(3, 7))), EOS] for _ in range(n)]


def language_batches(sentences: Sequence[Sequence[int]], batch_size: int) -> list[dict[str, Any]]:
    """Right-padded causal-LM batches (the model shifts the labels; padding is -100)."""
    batches = []
    for start in range(0, len(sentences), batch_size):
        rows = sentences[start : start + batch_size]
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), PAD)
        labels = torch.full((len(rows), length), -100)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = labels[i, : len(row)] = torch.tensor(row)
        batches.append(
            {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}
        )
    return batches


def target_share(prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
    """The reward: the share of a response's letters that are ``TARGET`` (0 if it has none)."""
    rewards = []
    for response in responses:
        letters = [t for t in response if t in LETTERS]
        rewards.append(letters.count(TARGET) / len(letters) if letters else 0.0)
    return rewards


def pretrain(model: torch.nn.Module, output_dir: str, steps: int, seed: int) -> None:
    """Teach the toy language with a plain treadle run (the HF model computes its loss)."""
    run = treadle.Run(
        model=model,
        train_data=language_batches(toy_sentences(16 * steps, seed), 16),
        config=treadle.Config(max_steps=steps, seed=seed, output_dir=output_dir, log_every=0),
        optimizer={"name": "adamw", "lr": 3e-3},
        loggers=[],
        checkpoint=None,
    )
    run.fit()


def make_raft(iterations: int, seed: int) -> Raft:
    prompts = [[BOS, letter] for letter in LETTERS]
    return Raft(
        prompts,
        target_share,
        iterations=iterations,
        prompts_per_iteration=8,
        k=8,
        batch_size=8,
        steps_per_iteration=4,
        generation=Generation(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD),
        seed=seed,
    )


def main(
    iterations: int = 8,
    seed: int = 0,
    pretrain_steps: int = 60,
    output_dir: str | None = None,
    verbose: bool = True,
) -> list[dict[str, float]]:
    """Pre-train, then align; returns the RAFT metrics of every iteration."""
    with tempfile.TemporaryDirectory(prefix="treadle-raft-") as scratch:
        root = output_dir or scratch
        model = tiny_gpt2(seed)
        pretrain(model, f"{root}/pretrain", pretrain_steps, seed)
        raft = make_raft(iterations, seed)
        run = treadle.Run(
            model=model,
            config=treadle.Config(seed=seed, output_dir=f"{root}/raft", log_every=0),
            optimizer={"name": "adamw", "lr": 1e-3},
            scheduler={"name": "linear", "warmup_steps": 2},
            loggers=[],
            plugins=[raft],
        )
        raft.fit(run)
    if verbose:
        print(f"{'iteration':>9} {'reward mean':>12} {'max':>6} {'kept mean':>10} {'kept':>5}")
        for m in raft.history:
            print(
                f"{int(m['raft/iteration']):>9} {m['raft/reward_mean']:>12.3f} "
                f"{m['raft/reward_max']:>6.2f} {m['raft/kept_reward_mean']:>10.3f} "
                f"{int(m['raft/kept']):>5}"
            )
    return raft.history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None)
    arguments = parser.parse_args()
    main(arguments.iterations, arguments.seed, output_dir=arguments.output_dir)
