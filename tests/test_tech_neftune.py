"""``neftune``: noisy input embeddings in training only, removed after fit."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import treadle
from treadle.errors import ConfigError
from treadle.plugins.techniques.neftune import NEFTune

VOCAB, WIDTH, LENGTH = 20, 16, 6


class TinyLM(nn.Module):
    """Records, at every forward, its embeddings as the model saw them and clean."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.records: list[tuple[bool, torch.Tensor, torch.Tensor]] = []

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        seen = self.embed(input_ids)
        clean = nn.functional.embedding(input_ids, self.embed.weight)
        self.records.append((self.training, seen.detach().clone(), clean.detach().clone()))
        logits = self.head(seen)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        return {"loss": loss, "logits": logits}


def data(n: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, VOCAB, (2, LENGTH), generator=generator) for _ in range(n)]
    return [{"input_ids": i, "labels": i} for i in ids]


def make_run(model: nn.Module, plugin: Any, **config: Any) -> treadle.Run:
    return treadle.Run(
        model,
        data(),
        eval_data=data(2),
        config=treadle.Config(max_steps=4, seed=0, **config),
        optimizer={"name": "sgd", "lr": 0.1},
        loggers=[],
        checkpoint=None,
        plugins=[plugin],
    )


@pytest.mark.timeout(60)
def test_training_embeddings_are_noisy_within_the_bound_and_eval_ones_clean() -> None:
    alpha = 5.0
    torch.manual_seed(0)
    model = TinyLM()
    make_run(model, {"name": "neftune", "alpha": alpha}, eval_every=2).fit()
    bound = alpha / math.sqrt(LENGTH * WIDTH)
    training = [(seen, clean) for is_training, seen, clean in model.records if is_training]
    evaluating = [(seen, clean) for is_training, seen, clean in model.records if not is_training]
    assert len(training) == 4 and len(evaluating) == 4  # two evaluations of two batches
    for seen, clean in training:
        noise = seen - clean
        assert noise.abs().max() <= bound * (1 + 1e-5)
        # uniform on [-bound, bound]: the largest of 192 draws is near the bound
        assert noise.abs().max() > 0.8 * bound
    for seen, clean in evaluating:
        assert torch.equal(seen, clean)


@pytest.mark.timeout(60)
def test_hook_is_removed_after_fit_and_after_an_exception() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    plugin = NEFTune(alpha=5.0)
    run = make_run(model, plugin)
    run.fit()
    assert not plugin.active
    model.train()
    ids = data(1)[0]["input_ids"]
    assert torch.equal(model.embed(ids), nn.functional.embedding(ids, model.embed.weight))

    class Boom:
        @treadle.hookimpl
        def on_step_end(self) -> None:
            assert plugin.active  # the noise was on during the fit
            raise RuntimeError("boom")

    run.add_plugin(Boom())
    with pytest.raises(Exception, match="boom"):
        run.fit(max_steps=8)
    assert not plugin.active
    assert torch.equal(model.embed(ids), nn.functional.embedding(ids, model.embed.weight))


def final_weights(alpha: float | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyLM()
    plugin: Any = {"name": "neftune", "alpha": alpha} if alpha else NoOp()
    make_run(model, plugin).fit()
    return {k: v.clone() for k, v in model.state_dict().items()}


class NoOp:
    @treadle.hookimpl
    def on_fit_begin(self) -> None:
        pass


@pytest.mark.timeout(60)
def test_deterministic_under_a_seed_and_different_from_clean_training() -> None:
    first, second, clean = final_weights(5.0), final_weights(5.0), final_weights(None)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], clean[k]) for k in first)


def test_named_module_option_and_errors() -> None:
    class NoGetter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(VOCAB, WIDTH)

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
            return {"loss": self.tok(input_ids).sum()}

    with pytest.raises(ConfigError, match=r"get_input_embeddings.*tok"):
        make_run(NoGetter(), "neftune")
    with pytest.raises(ConfigError, match=r"'wte'.*no such submodule.*tok"):
        make_run(NoGetter(), {"name": "neftune", "module": "wte"})
    plugin = NEFTune(module="tok")
    make_run(NoGetter(), plugin).fit()


@pytest.mark.parametrize("alpha", [0, -1.0, float("inf"), True, "5"])
def test_bad_alpha(alpha: Any) -> None:
    with pytest.raises(ConfigError, match="alpha"):
        NEFTune(alpha=alpha)


@pytest.mark.timeout(60)
def test_hugging_face_gpt2_embeddings_get_the_noise() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    plugin = NEFTune(alpha=10.0)
    seen: list[torch.Tensor] = []
    embeddings = model.get_input_embeddings()

    class Spy:
        @treadle.hookimpl
        def on_step_begin(self) -> None:
            if not seen:
                ids = data(1)[0]["input_ids"]
                seen.append(embeddings(ids) - nn.functional.embedding(ids, embeddings.weight))

    treadle.Run(
        model,
        data(),
        config=treadle.Config(max_steps=1),
        optimizer={"name": "sgd", "lr": 0.1},
        loggers=[],
        checkpoint=None,
        plugins=[plugin, Spy()],
    ).fit()
    bound = 10.0 / math.sqrt(LENGTH * 32)
    assert 0 < seen[0].abs().max() <= bound * (1 + 1e-5)
