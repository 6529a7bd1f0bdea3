"""Shared builders for treadle-raft tests: the example's tiny GPT-2 and toy reward, and a
small RAFT run (no pre-training) that finishes in seconds."""

from __future__ import annotations

from typing import Any

from treadle_raft import Generation, Raft
from treadle_raft.example import BOS, EOS, LETTERS, PAD, target_share, tiny_gpt2

import treadle


def small_raft(iterations: int = 3, steps: int = 2, **options: Any) -> Raft:
    """4 prompts x 4 responses per iteration, 8 new tokens at most, batches of 4."""
    settings: dict[str, Any] = {
        "iterations": iterations,
        "prompts_per_iteration": 4,
        "k": 4,
        "batch_size": 4,
        "steps_per_iteration": steps,
        "generation": Generation(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD),
        "seed": 7,
        **options,
    }
    return Raft([[BOS, letter] for letter in LETTERS], target_share, **settings)


def small_run(
    output_dir: str, raft: Raft, *, dropout: float = 0.0, strategy: Any = "single", **config: Any
) -> treadle.Run:
    return treadle.Run(
        model=tiny_gpt2(0, dropout=dropout),
        strategy=strategy,
        config=treadle.Config(seed=0, output_dir=output_dir, log_every=0, **config),
        optimizer={"name": "adamw", "lr": 1e-3},
        scheduler={"name": "linear", "warmup_steps": 1},
        loggers=[],
        plugins=[raft],
    )
