"""The benchmark workloads: models and data built from config, with no download.

Every workload is deterministic (a fixed seed for the weights, another for the data), so two
processes that build it hold identical weights and batches, which is what lets the suite check
that the bare loop and treadle end with identical weights. Batches are ready-made mappings of
tensors kept in memory and cycled: data loading is not what is measured.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]

__all__ = ["WORKLOADS", "Batch", "Workload", "available"]


@dataclass(frozen=True)
class Workload:
    """One model and its data, with the suite's step counts.

    Attributes:
        name: the name used on the command line and in the tables.
        description: one line for the report.
        build: ``build(batch_size, seq_len) -> (model, batches)``.
        batch_size, seq_len: the defaults (``seq_len`` 0 for a model without tokens).
        steps, warmup: measured and discarded optimizer steps per process (full suite).
        quick_steps, quick_warmup: the same for ``--quick``.
        requires: modules the workload needs (it is skipped, with a note, without them).
    """

    name: str
    description: str
    build: Callable[[int, int], tuple[nn.Module, list[Batch]]]
    batch_size: int
    seq_len: int
    steps: int
    warmup: int
    quick_steps: int
    quick_warmup: int
    requires: tuple[str, ...] = ()

    def tokens_per_batch(self, batch_size: int | None = None, seq_len: int | None = None) -> int:
        return (batch_size or self.batch_size) * (seq_len or self.seq_len)


def available(module: str) -> bool:
    """Whether ``module`` is importable, without importing it."""
    return importlib.util.find_spec(module) is not None


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


# ------------------------------------------------------------------ (a) tiny MLP


class MLP(nn.Module):
    """A three-layer perceptron that returns ``{"loss": cross-entropy}`` from ``(x, y)``.

    Small on purpose: a step costs a few hundred microseconds on one CPU thread, so any
    per-step cost of the framework around it shows in the step time.
    """

    def __init__(self, features: int = 32, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(self.net(x), y)}


def build_mlp(batch_size: int, seq_len: int) -> tuple[nn.Module, list[Batch]]:
    torch.manual_seed(0)
    model = MLP()
    generator = _generator(1)
    teacher = torch.randn(32, 10, generator=generator)  # a learnable labelling
    batches = []
    for _ in range(32):
        x = torch.randn(batch_size, 32, generator=generator)
        batches.append({"x": x, "y": (x @ teacher).argmax(dim=1)})
    return model, batches


# ------------------------------------------------------------------ (b) GPT-2, (c) BERT


def gpt2_config(**overrides: Any) -> Any:
    """A ``GPT2Config`` without dropout (so every framework does the same arithmetic)."""
    from transformers import GPT2Config

    options = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **overrides}
    return GPT2Config(**options)


def build_gpt2(batch_size: int, seq_len: int) -> tuple[nn.Module, list[Batch]]:
    """A 2-layer GPT-2 (d=128, 4 heads, vocabulary 2048) on random tokens; labels = inputs."""
    from transformers import GPT2LMHeadModel

    config = gpt2_config(vocab_size=2048, n_positions=seq_len, n_embd=128, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    generator = _generator(1)
    batches = []
    for _ in range(8):
        ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return model, batches


def build_gpt2_124m(batch_size: int, seq_len: int) -> tuple[nn.Module, list[Batch]]:
    """GPT-2 small (124M parameters, ``GPT2Config()`` defaults) on random tokens."""
    from transformers import GPT2LMHeadModel

    config = gpt2_config(n_positions=max(seq_len, 1024))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    generator = _generator(1)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return model, batches


MASK_ID = 4  # a token id reserved as [MASK]: random tokens are drawn from ids >= 5


def build_bert(batch_size: int, seq_len: int) -> tuple[nn.Module, list[Batch]]:
    """A 2-layer BERT masked LM (d=128, 4 heads) with 15% of random tokens masked."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=2048,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=seq_len,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    generator = _generator(1)
    batches = []
    for _ in range(8):
        ids = torch.randint(
            MASK_ID + 1, config.vocab_size, (batch_size, seq_len), generator=generator
        )
        masked = torch.rand(batch_size, seq_len, generator=generator) < 0.15
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        batches.append({"input_ids": torch.where(masked, MASK_ID, ids), "labels": labels})
    return model, batches


WORKLOADS: dict[str, Workload] = {
    "mlp": Workload(
        name="mlp",
        description="MLP 32-128-128-10, batch 64, AdamW: framework overhead dominates",
        build=build_mlp,
        batch_size=64,
        seq_len=0,
        steps=3000,
        warmup=100,
        quick_steps=600,
        quick_warmup=50,
    ),
    "gpt2": Workload(
        name="gpt2",
        description="GPT-2, 2 layers, d=128, vocab 2048, batch 8 x 128 random tokens, AdamW",
        build=build_gpt2,
        batch_size=8,
        seq_len=128,
        steps=200,
        warmup=10,
        quick_steps=30,
        quick_warmup=5,
        requires=("transformers",),
    ),
    "bert": Workload(
        name="bert",
        description="BERT masked LM, 2 layers, d=128, vocab 2048, batch 8 x 128, 15% masked, AdamW",
        build=build_bert,
        batch_size=8,
        seq_len=128,
        steps=200,
        warmup=10,
        quick_steps=30,
        quick_warmup=5,
        requires=("transformers",),
    ),
    # the GPU variant (``python -m tests.bench --cuda``); the batch size is chosen to fill the device
    "gpt2-124m": Workload(
        name="gpt2-124m",
        description="GPT-2 124M (GPT2Config defaults), bf16-mixed, fused AdamW",
        build=build_gpt2_124m,
        batch_size=8,
        seq_len=1024,
        steps=100,
        warmup=15,
        quick_steps=20,
        quick_warmup=5,
        requires=("transformers",),
    ),
}
