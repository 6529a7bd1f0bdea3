"""The options of a RAFT run, checked when they are given (before any compute)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from treadle import ConfigError


@dataclass(frozen=True)
class Generation:
    """How responses are sampled with the model's ``generate`` (Hugging Face's meaning).

    ``top_k=0`` and ``top_p=1.0`` switch those filters off. ``extra`` goes to ``generate``
    unchanged (e.g. ``{"repetition_penalty": 1.1}``).
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _at_least("Generation.max_new_tokens", self.max_new_tokens, 1)
        if not self.temperature > 0:
            raise ConfigError(f"Generation.temperature = {self.temperature!r}: it must be > 0")
        _at_least("Generation.top_k", self.top_k, 0)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"Generation.top_p = {self.top_p!r}: it must be in (0, 1]")

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "do_sample": True,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
        }
        if self.eos_token_id is not None:
            kwargs["eos_token_id"] = self.eos_token_id
        if self.pad_token_id is not None:
            kwargs["pad_token_id"] = self.pad_token_id
        return {**kwargs, **self.extra}


@dataclass(frozen=True)
class Schedule:
    """How many prompts, responses and steps each iteration has.

    ``batch_size`` is the global number of kept samples per optimizer step (over all ranks and
    the ``grad_accum_steps`` micro-batches of the run's config). Give ``steps_per_iteration``
    or ``epochs_per_iteration``: epochs are turned into steps,
    ``ceil(epochs x kept / batch_size)``, since the number kept per iteration is known ahead.
    """

    iterations: int
    prompts_per_iteration: int
    k: int
    batch_size: int
    steps_per_iteration: int | None = None
    epochs_per_iteration: float | None = None
    top_fraction: float | None = None

    def __post_init__(self) -> None:
        _at_least("iterations", self.iterations, 1)
        _at_least("prompts_per_iteration", self.prompts_per_iteration, 1)
        _at_least("k", self.k, 1)
        _at_least("batch_size", self.batch_size, 1)
        if (self.steps_per_iteration is None) == (self.epochs_per_iteration is None):
            raise ConfigError("give exactly one of steps_per_iteration and epochs_per_iteration")
        if self.steps_per_iteration is not None:
            _at_least("steps_per_iteration", self.steps_per_iteration, 1)
        if self.epochs_per_iteration is not None and not self.epochs_per_iteration > 0:
            raise ConfigError(
                f"epochs_per_iteration = {self.epochs_per_iteration!r}: it must be > 0"
            )
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ConfigError(f"top_fraction = {self.top_fraction!r}: it must be in (0, 1]")

    @property
    def responses(self) -> int:
        """Responses generated per iteration (all ranks together)."""
        return self.prompts_per_iteration * self.k

    @property
    def kept(self) -> int:
        """Samples kept per iteration: one per prompt, or the top fraction of all responses."""
        if self.top_fraction is None:
            return self.prompts_per_iteration
        return max(1, round(self.top_fraction * self.responses))

    @property
    def steps(self) -> int:
        """Optimizer steps per iteration."""
        if self.steps_per_iteration is not None:
            return self.steps_per_iteration
        assert self.epochs_per_iteration is not None
        return max(1, math.ceil(self.epochs_per_iteration * self.kept / self.batch_size))

    @property
    def total_steps(self) -> int:
        return self.iterations * self.steps


def _at_least(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} = {value!r}: it must be an integer >= {minimum}")
