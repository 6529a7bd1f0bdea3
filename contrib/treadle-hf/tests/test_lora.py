"""The ``lora`` plugin and the ``adapter`` checkpoint format, on a tiny random GPT-2.

Only adapter parameters reach the optimizer; checkpoints hold the adapter alone; resuming is
bit-exact on CPU; the adapter folder reloads with ``PeftModel.from_pretrained`` to identical
logits; the merged folder is a plain model for ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_gpt2, token_batches
from treadle_hf import lora

import treadle
from treadle import checkpoint as treadle_checkpoint

peft = pytest.importorskip("peft")
pytestmark = [
    pytest.mark.timeout(180),
    # peft says it switches fan_in_fan_out on for GPT-2's Conv1D layers: expected here
    pytest.mark.filterwarnings("ignore:fan_in_fan_out"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated"),
]

VOCAB = 100
LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["c_attn"]}


def _gpt2(seed: int = 0):
    return tiny_gpt2(seed, dropout=0.1)  # GPT-2's default dropout: these runs train with it


def _run(model, out: Path, steps: int, *, plugin: Any = None, **options: Any) -> treadle.Run:
    options.setdefault("checkpoint", "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", treadle.TreadleWarning)
        return treadle.Run(
            model=model,
            train_data=token_batches(),
            config=treadle.Config(
                max_steps=steps,
                output_dir=str(out),
                log_every=0,
                resume=options.pop("resume", None),
            ),
            optimizer={"name": "adamw", "lr": 1e-2},
            loggers=(),
            plugins=[plugin if plugin is not None else dict(LORA)],
            **options,
        )


def _fit(run: treadle.Run) -> treadle.Run:
    run.fit()
    run.close()
    return run


def _plugin(run: treadle.Run) -> lora.LoRA:
    (found,) = [p for p in run.plugin_manager.get_plugins() if isinstance(p, lora.LoRA)]
    return found


def _logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = (
        ids
        if ids is not None
        else torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(7))
    )
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _weight_bytes(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint.glob("model*.safetensors"))


def test_only_adapter_parameters_reach_the_optimizer(tmp_path: Path) -> None:
    run = _fit(_run(_gpt2(), tmp_path / "run", 2))
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    in_optimizer = [p for group in run.optimizer.param_groups for p in group["params"]]
    assert len(in_optimizer) == len(trainable) == 4  # lora_A and lora_B of 2 c_attn layers
    assert {id(p) for p in in_optimizer} == {id(p) for p in trainable}
    names = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    assert isinstance(_plugin(run).peft_model, peft.PeftModel)
    assert _plugin(run).peft_model.base_model.model is run.model  # injected in place


def test_checkpoint_stores_the_adapter_alone(tmp_path: Path) -> None:
    adapter_run = _fit(_run(_gpt2(), tmp_path / "adapter", 2))
    full_run = _fit(_run(_gpt2(), tmp_path / "full", 2, checkpoint="safetensors"))
    adapter_ckpt, full_ckpt = adapter_run.last_checkpoint, full_run.last_checkpoint
    assert treadle_checkpoint.verify(adapter_ckpt) == []
    fraction = _weight_bytes(adapter_ckpt) / _weight_bytes(full_ckpt)
    assert fraction < 0.2, fraction
    from safetensors.torch import load_file

    stored = load_file(adapter_ckpt / "model.safetensors")
    assert sorted(stored) == sorted(n for n, p in adapter_run.model.named_parameters()
                                    if p.requires_grad)  # fmt: skip


def test_resume_is_exact(tmp_path: Path) -> None:
    straight = _fit(_run(_gpt2(), tmp_path / "straight", 8))

    _fit(_run(_gpt2(), tmp_path / "split", 4))
    resumed = _fit(_run(_gpt2(), tmp_path / "split", 8, resume="auto"))

    assert resumed.state.step == 8
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert any(not torch.equal(v, 0 * v) for k, v in a.items() if "lora_B" in k)  # it trained


def test_same_seed_same_initial_adapter_global_stream_untouched(tmp_path: Path) -> None:
    model = _gpt2()
    stream = torch.get_rng_state()
    first = _run(model, tmp_path / "a", 1)
    assert torch.equal(torch.get_rng_state(), stream)  # the adapter drew from its own generator
    second = _run(_gpt2(), tmp_path / "b", 1)
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_folder_reloads_with_peft_to_identical_logits(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    run = _fit(_run(_gpt2(), tmp_path / "run", 3, plugin={**LORA, "export_dir": str(out)}))
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    expected = _logits(run.model)

    reloaded = peft.PeftModel.from_pretrained(_gpt2(), out)
    assert torch.equal(_logits(reloaded), expected)

    # the same folder from the checkpoint, after the run is gone
    again = lora.export_adapter(
        run.last_checkpoint, tmp_path / "from-ckpt", _gpt2(),
        r=4, alpha=8, dropout=0.1, target_modules=["c_attn"],
    )  # fmt: skip
    assert torch.equal(_logits(peft.PeftModel.from_pretrained(_gpt2(), again)), expected)


def test_merged_export_is_a_plain_model_folder(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run = _fit(_run(_gpt2(), tmp_path / "run", 3))
    expected = _logits(run.model)
    out = _plugin(run).save_merged(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name in merged.state_dict())
    # W x + B(A x) and (W + BA) x round differently: close, not bit-equal
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=1e-6)
    # the run's model keeps its adapter (the merge happened on a copy)
    assert torch.equal(_logits(run.model), expected)

    via_checkpoint = lora.export_adapter(
        run.last_checkpoint, tmp_path / "merged2", _gpt2(), merge=True,
        r=4, alpha=8, dropout=0.1, target_modules=["c_attn"],
    )  # fmt: skip
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(via_checkpoint)),
                       _logits(merged))  # fmt: skip


def test_a_peft_config_object(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"], fan_in_fan_out=True)
    run = _fit(_run(_gpt2(), tmp_path / "run", 1, plugin=lora.LoRA(config=config)))
    names = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert len(names) == 4 and all(".mlp.c_fc.lora_" in n for n in names)


def test_adapter_checkpoint_into_a_model_without_the_adapter(tmp_path: Path) -> None:
    run = _fit(_run(_gpt2(), tmp_path / "run", 1))
    with pytest.raises(treadle.TreadleError, match="does not fit this model"):
        treadle.load_weights(_gpt2(), run.last_checkpoint)


def test_full_checkpoints_are_announced(tmp_path: Path) -> None:
    with pytest.warns(treadle.TreadleWarning, match="checkpoint='adapter'"):
        treadle.Run(
            model=_gpt2(),
            config=treadle.Config(max_steps=1, output_dir=str(tmp_path / "r")),
            loggers=(),
            plugins=[dict(LORA)],
        )


def test_options_and_config_are_exclusive() -> None:
    with pytest.raises(treadle.ConfigError, match="either a peft config or LoRA options"):
        lora.apply(_gpt2(), peft.LoraConfig(r=2), r=4)


def test_an_existing_export_dir_is_refused_when_composed(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("not ours")
    with pytest.raises(treadle.TreadleError, match="already exists"):
        _run(_gpt2(), tmp_path / "run", 1, plugin={**LORA, "export_dir": str(taken)})
    assert (taken / "keep.txt").read_text() == "not ours"
