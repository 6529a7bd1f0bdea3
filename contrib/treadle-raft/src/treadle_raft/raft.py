"""``Raft``: the reward-ranked fine-tuning loop, as a treadle plugin and a short driver.

Each RAFT iteration is one epoch of the run: when its data is first iterated, the current
model samples ``k`` responses to each of the iteration's prompts, the reward function scores
them, the best are kept, and the epoch's micro-batches are cut from the kept pairs. The driver
(:meth:`Raft.fit`) calls ``run.fit`` once per iteration; the optimizer, the scheduler (built
for all iterations' steps) and the state carry over, as ``run.fit`` keeps them.

Everything the next sample depends on (the iteration, the prompt position, the generator's
state and the kept pairs of the current iteration) is in the plugin's part of every
checkpoint, so a run resumed from any step, even mid-iteration, continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import nn

import treadle
from treadle import ConfigError, State
from treadle_raft.batches import Pair, micro_batches, token_loss
from treadle_raft.sampling import sample_responses
from treadle_raft.selection import Scored, reward_stats, select
from treadle_raft.settings import Generation, Schedule

#: ``reward_fn(prompts, responses) -> one float per response``; token-id lists, or text when
#: the ``Raft`` has a tokenizer.
RewardFn = Callable[[list[Any], list[Any]], Sequence[float]]

STATE_KEY = "raft"
_STATE_VERSION = 1


class Raft:
    """Reward-ranked fine-tuning (RAFT, Dong et al. 2023) on a ``treadle.Run``.

    Args:
        prompts: token-id sequences, or strings when ``tokenizer`` is given. Iterations take
            ``prompts_per_iteration`` of them in order, wrapping around.
        reward_fn: ``reward_fn(prompts, responses)`` returns one float per response. It gets
            token-id lists, or decoded text when ``tokenizer`` is given; each rank calls it on
            the responses it sampled.
        iterations: RAFT iterations (generate, select, fine-tune).
        prompts_per_iteration: prompts per iteration, over all ranks.
        k: responses sampled per prompt.
        batch_size: kept samples per optimizer step, over all ranks (see ``Schedule``).
        steps_per_iteration, epochs_per_iteration: fine-tuning per iteration (give one).
        top_fraction: None keeps the best response of each prompt; a fraction keeps that share
            of all the iteration's responses, best first.
        generation: sampling settings (``Generation``).
        tokenizer: a Hugging Face tokenizer, to encode string prompts and decode for rewards.
        pad_token_id: padding for training batches (default: the generation's, the
            tokenizer's, then 0; padding never reaches the loss).
        seed: the generator's seed (default: the run's ``Config.seed``).
        loss_normalization: the ``Config.loss_normalization`` the RAFT fits use: ``"tokens"``
            averages the loss over all response tokens of a step, on all ranks alike.
    """

    name = STATE_KEY

    def __init__(
        self,
        prompts: Sequence[Sequence[int] | str],
        reward_fn: RewardFn,
        *,
        iterations: int,
        prompts_per_iteration: int,
        k: int = 8,
        batch_size: int = 8,
        steps_per_iteration: int | None = None,
        epochs_per_iteration: float | None = None,
        top_fraction: float | None = None,
        generation: Generation | None = None,
        tokenizer: Any = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
        loss_normalization: str = "tokens",
    ) -> None:
        if not callable(reward_fn):
            raise ConfigError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
        if steps_per_iteration is None and epochs_per_iteration is None:
            steps_per_iteration = 1
        self.schedule = Schedule(
            iterations=iterations,
            prompts_per_iteration=prompts_per_iteration,
            k=k,
            batch_size=batch_size,
            steps_per_iteration=steps_per_iteration,
            epochs_per_iteration=epochs_per_iteration,
            top_fraction=top_fraction,
        )
        self.generation = generation or Generation()
        self.reward_fn = reward_fn
        self.tokenizer = tokenizer
        self.prompts = [self._encode(p) for p in prompts]
        if not self.prompts:
            raise ConfigError("RAFT needs at least one prompt")
        self.pad_token_id = _first_set(
            pad_token_id,
            self.generation.pad_token_id,
            getattr(tokenizer, "pad_token_id", None),
            0,
        )
        self.seed = seed
        self.loss_normalization = loss_normalization
        #: one record per iteration sampled in this process: what was logged
        self.history: list[dict[str, float]] = []
        #: how many prompts this rank sampled in its last iteration (its shard)
        self.prompts_sampled_here = 0
        # what a checkpoint keeps
        self._generator: torch.Generator | None = None
        self._prompt_position = 0
        self._kept: list[Pair] = []
        self._kept_iteration: int | None = None
        self._shuffle_seed = 0
        self._active = False  # inside Raft.fit: the hooks below act only then

    # ------------------------------------------------------------------ the driver

    def fit(self, run: treadle.Run) -> State:
        """Run every remaining iteration: one ``run.fit`` per iteration.

        ``run`` must not have been fit before (its epochs count RAFT iterations); with
        ``Config.resume`` it continues from its checkpoint, wherever in an iteration that is.
        """
        if run.optimizer is not None:
            raise ConfigError(
                "Raft.fit needs a run that has not been fit yet: its epochs count RAFT "
                "iterations and its schedule spans all of them. Fine-tune first with another "
                "treadle.Run on the same model, then build one for RAFT."
            )
        if not run.plugin_manager.is_registered(self):
            run.add_plugin(self)
        schedule = self.schedule
        changes = {
            "max_steps": schedule.total_steps,  # the scheduler's total: all iterations
            "max_epochs": schedule.iterations,
            "loss_normalization": self.loss_normalization,
        }
        self._active = True
        try:
            while True:
                before = (run.state.step, run.state.epoch)
                state = run.fit(train_data=_IterationData(self, run), **changes)
                done = state.step >= schedule.total_steps or state.epoch >= schedule.iterations
                ours = state.stop_reason is None or state.stop_reason.startswith("raft:")
                if done or not ours or (state.step, state.epoch) == before:
                    return state  # finished, or stopped by someone else (early stopping, ...)
        finally:
            self._active = False

    # ------------------------------------------------------------------ hooks

    @treadle.hookimpl
    def compute_loss(self, model: nn.Module, batch: Any) -> treadle.LossSum | None:
        if self._active and isinstance(batch, Mapping) and "labels" in batch:
            return token_loss(model, batch)
        return None  # not a RAFT fit: the next implementation (the kernel's) computes it

    @treadle.hookimpl
    def on_epoch_end(self, run: treadle.Run, epoch: int) -> None:
        if self._active:  # one run.fit per iteration: the driver starts the next
            run.request_stop(f"raft: iteration {epoch} done", final=False)

    @treadle.hookimpl
    def on_save_checkpoint(self, plugin_state: MutableMapping[str, Any]) -> None:
        plugin_state[STATE_KEY] = {
            "version": _STATE_VERSION,
            "generator": None
            if self._generator is None
            else bytes(self._generator.get_state().numpy().tobytes()).hex(),
            "prompt_position": self._prompt_position,
            "kept_iteration": self._kept_iteration,
            "kept": [[list(p), list(r)] for p, r in self._kept],
            "shuffle_seed": self._shuffle_seed,
        }

    @treadle.hookimpl
    def on_load_checkpoint(self, plugin_state: Mapping[str, Any]) -> None:
        saved = plugin_state.get(STATE_KEY)
        if saved is None:
            return
        if saved.get("version") != _STATE_VERSION:
            raise treadle.CheckpointError(
                f"RAFT state version {saved.get('version')!r} is not supported"
            )
        hex_state = saved["generator"]
        self._generator = None
        if hex_state is not None:
            self._generator = torch.Generator()
            state = torch.frombuffer(bytearray(bytes.fromhex(hex_state)), dtype=torch.uint8)
            self._generator.set_state(state)
        self._prompt_position = int(saved["prompt_position"])
        self._kept_iteration = saved["kept_iteration"]
        self._kept = [(tuple(p), tuple(r)) for p, r in saved["kept"]]
        self._shuffle_seed = int(saved["shuffle_seed"])

    # ------------------------------------------------------------------ one iteration

    def iteration_batches(self, run: treadle.Run) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the iteration ``run.state.epoch`` (sampling first if
        that iteration has not been sampled yet)."""
        iteration = run.state.epoch
        if self._kept_iteration != iteration:
            self._sample_iteration(run, iteration)
        return micro_batches(
            self._kept,
            steps=self.schedule.steps,
            batch_size=self.schedule.batch_size,
            grad_accum_steps=run.config.grad_accum_steps,
            rank=run.strategy.rank,
            world_size=run.strategy.world_size,
            seed=self._shuffle_seed,
            pad_token_id=self.pad_token_id,
        )

    def _sample_iteration(self, run: treadle.Run, iteration: int) -> None:
        schedule, strategy = self.schedule, run.strategy
        generator = self._rng(run)
        count = schedule.prompts_per_iteration
        indices = [(self._prompt_position + j) % len(self.prompts) for j in range(count)]
        # every rank draws every prompt's seed, so that each prompt is sampled alike
        # whichever rank has it
        seeds = torch.randint(0, 2**62, (count,), generator=generator).tolist()
        shuffle_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        mine = range(strategy.rank, count, strategy.world_size)
        self.prompts_sampled_here = len(mine)
        prompts, responses, places = [], [], []
        for j in mine:
            prompt = self.prompts[indices[j]]
            sampled = sample_responses(
                run.model, prompt, schedule.k, self.generation, seeds[j], run.device
            )
            for s, response in enumerate(sampled):
                prompts.append(prompt)
                responses.append(tuple(response))
                places.append((j, s))
        rewards = self._score(prompts, responses)
        local = [
            (j, s, tuple(p), r, reward)
            for (j, s), p, r, reward in zip(places, prompts, responses, rewards, strict=True)
        ]
        everything = [Scored(*item) for part in strategy.all_gather_object(local) for item in part]
        kept = select(everything, schedule.top_fraction, schedule.kept)
        self._kept = [(item.prompt, item.response) for item in kept]
        self._kept_iteration, self._shuffle_seed = iteration, shuffle_seed
        self._prompt_position = (self._prompt_position + count) % len(self.prompts)
        metrics: dict[str, float] = {
            "raft/iteration": float(iteration),
            **reward_stats([item.reward for item in everything], "raft/reward"),
            **reward_stats([item.reward for item in kept], "raft/kept_reward"),
            "raft/kept": float(len(kept)),
            "raft/response_length": sum(len(i.response) for i in everything) / len(everything),
        }
        self.history.append(metrics)
        run.log(metrics)

    def _score(
        self, prompts: list[tuple[int, ...]], responses: list[tuple[int, ...]]
    ) -> list[float]:
        if not responses:
            return []
        if self.tokenizer is not None:
            decode = self.tokenizer.decode
            given: tuple[list[Any], list[Any]] = (
                [decode(p, skip_special_tokens=True) for p in prompts],
                [decode(r, skip_special_tokens=True) for r in responses],
            )
        else:
            given = ([list(p) for p in prompts], [list(r) for r in responses])
        rewards = [float(x) for x in self.reward_fn(*given)]
        if len(rewards) != len(responses):
            raise ValueError(
                f"reward_fn returned {len(rewards)} rewards for {len(responses)} responses"
            )
        return rewards

    def _rng(self, run: treadle.Run) -> torch.Generator:
        if self._generator is None:
            seed = run.config.seed if self.seed is None else self.seed
            self._generator = torch.Generator().manual_seed(seed)
        return self._generator

    def _encode(self, prompt: Sequence[int] | str) -> tuple[int, ...]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("prompts are strings: pass tokenizer= to encode them")
            return tuple(self.tokenizer.encode(prompt))
        return tuple(int(t) for t in prompt)


class _IterationData:
    """One iteration's micro-batches, sampled when first iterated: by then a resumed run has
    loaded its checkpoint, so sampling continues from the saved generator and prompt position
    (or, mid-iteration, the saved kept pairs are cut into the same batches again)."""

    def __init__(self, raft: Raft, run: treadle.Run) -> None:
        self.raft, self.run = raft, run

    def __len__(self) -> int:  # known before sampling: the schedule fixes it
        return self.raft.schedule.steps * self.run.config.grad_accum_steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.raft.iteration_batches(self.run))


def _first_set(*values: int | None) -> int:
    for value in values:
        if value is not None:
            return value
    raise AssertionError("unreachable: the last default is set")
