"""Scored responses, the choice of the ones to keep, and reward statistics."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Scored:
    """One response: ``prompt_index`` is its prompt's place in the iteration (0-based, over all
    ranks), ``sample`` its place among that prompt's ``k`` responses."""

    prompt_index: int
    sample: int
    prompt: tuple[int, ...]
    response: tuple[int, ...]
    reward: float


def select(scored: Sequence[Scored], top_fraction: float | None, kept: int) -> list[Scored]:
    """The samples to fine-tune on, in a fixed order (the same on every rank).

    ``top_fraction=None``: the best response of each prompt (RAFT's best-of-K). Otherwise the
    ``kept`` best responses of the iteration, over all prompts. Ties go to the earlier prompt
    and sample, so that the choice never depends on the order the ranks delivered them.
    """
    ordered = sorted(scored)
    if top_fraction is None:
        best: dict[int, Scored] = {}
        for item in ordered:
            current = best.get(item.prompt_index)
            if current is None or item.reward > current.reward:
                best[item.prompt_index] = item
        return [best[index] for index in sorted(best)]
    ranked = sorted(ordered, key=lambda item: -item.reward)  # stable: ties keep their order
    return sorted(ranked[:kept])


def reward_stats(rewards: Sequence[float], prefix: str) -> dict[str, float]:
    """Mean, max and (population) standard deviation, as ``{prefix}_mean`` and so on."""
    if not rewards:
        return {}
    return {
        f"{prefix}_mean": float(statistics.fmean(rewards)),
        f"{prefix}_max": float(max(rewards)),
        f"{prefix}_std": float(statistics.pstdev(rewards)),
    }
