"""Fine-tune a small transformer: a GPT-2 built from its config (random weights, nothing
downloaded) learns to continue arithmetic sequences generated in code.

    python examples/finetune_transformer.py --steps 60 --out runs/finetune

Needs ``transformers`` (``pip install -c constraints.txt transformers``).
"""

from __future__ import annotations

import argparse

import torch

import treadle

VOCAB, LENGTH = 64, 32


class Sequences(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Rows of ``start, start + step, start + 2 * step, ...`` modulo the vocabulary."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (count, 1), generator=generator)
        step = torch.randint(1, 5, (count, 1), generator=generator)
        self.ids = (start + step * torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/finetune")
    args = parser.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)  # returns .loss when the batch has labels
    run = treadle.Run(
        model,
        train_data=Sequences(512, seed=1),  # batched by treadle (Config.batch_size)
        eval_data=Sequences(64, seed=2),
        config=treadle.Config(
            max_steps=args.steps,
            batch_size=16,
            log_every=10,
            eval_every=max(args.steps // 2, 1),
            save_every=max(args.steps // 2, 1),
            keep_last=1,
            output_dir=args.out,
        ),
        optimizer={"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        scheduler={"name": "cosine", "warmup_steps": max(args.steps // 10, 1)},
        loggers=["console", "jsonl"],
        plugins=[{"name": "grad-clip", "max_norm": 1.0}],
    )
    run.fit()
    loss = run.state.last_metrics["eval/loss"]
    print(f"eval loss after {run.state.step} steps: {loss:.3f}")
    return float(loss)


if __name__ == "__main__":
    main()
