"""What the two-process test runs on each rank (``treadle.testing.run_distributed`` imports
it by name, so it lives in a module of its own)."""

from __future__ import annotations

from typing import Any

from conftest import small_raft, small_run


def raft_result(output_dir: str, world_size: int) -> dict[str, Any]:
    """Two RAFT iterations of the small run; what the comparison needs."""
    strategy = {"name": "ddp", "device": "cpu"} if world_size > 1 else "single"
    raft = small_raft(iterations=2, steps=2)
    run = small_run(output_dir, raft, strategy=strategy)
    raft.fit(run)
    return {
        "weights": {k: v.detach().clone() for k, v in run.model.state_dict().items()},
        "history": [[m[k] for k in sorted(m)] for m in raft.history],
        "kept": [[list(p), list(r)] for p, r in raft._kept],  # our own state
        "step": run.state.step,
        "sampled_here": raft.prompts_sampled_here,
    }
