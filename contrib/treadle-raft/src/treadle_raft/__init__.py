"""treadle-raft: RAFT (reward-ranked fine-tuning) on treadle, from the public API only.

raft = Raft(prompts, reward_fn, iterations=5, prompts_per_iteration=16, k=8,
            batch_size=8, steps_per_iteration=4)
raft.fit(treadle.Run(model=model, optimizer={"name": "adamw", "lr": 1e-3}))
"""

from treadle_raft.raft import Raft, RewardFn
from treadle_raft.settings import Generation, Schedule

__all__ = ["Generation", "Raft", "RewardFn", "Schedule"]
__version__ = "0.1.0"
