"""save_pretrained layout from treadle checkpoints: every format, shards, tied weights, tokenizer.

Each test trains a tiny random GPT-2 a couple of steps (so the weights are not the initial
ones), exports a checkpoint and reloads the folder with ``from_pretrained``: the logits must be
identical (``torch.equal``), not merely close.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, token_batches
from treadle_hf import export as hf_export

import treadle
from treadle import checkpoint as treadle_checkpoint

pytestmark = pytest.mark.timeout(120)

VOCAB = 100


def _gpt2(seed: int = 0):
    return tiny_gpt2(seed, dropout=0.1)  # GPT-2's default dropout: these runs train with it


def _train(tmp_path: Path, model, checkpoint="safetensors", steps: int = 2) -> Path:
    """A short run; returns its output directory (holding checkpoints/)."""
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = treadle.Run(
            model=model,
            train_data=token_batches(),
            config=treadle.Config(max_steps=steps, output_dir=str(out), log_every=0),
            optimizer={"name": "adamw", "lr": 1e-2},
            loggers=(),
            checkpoint=checkpoint,
        )
        run.fit()
        run.close()
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(7))


def _reload(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def _tiny_tokenizer():
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def test_safetensors_checkpoint_exports_to_identical_logits(tmp_path: Path) -> None:
    model = _gpt2()
    run_dir = _train(tmp_path, model)
    out = hf_export.export_pretrained(run_dir, tmp_path / "hf", model)

    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    reloaded = _reload(out)
    assert torch.equal(_logits(reloaded, _probe()), _logits(model, _probe()))
    # the tie survives: one tensor, as transformers builds it
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()


def test_sharded_checkpoint_exports_to_shards_with_index(tmp_path: Path) -> None:
    model = _gpt2()
    run_dir = _train(tmp_path, model, {"name": "safetensors", "max_shard_size": "20KB"})
    assert (treadle_checkpoint.resolve(run_dir) / "model.safetensors.index.json").is_file()
    out = hf_export.export_pretrained(run_dir, tmp_path / "hf", model, max_shard_size="20KB")

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert torch.equal(_logits(_reload(out), _probe()), _logits(model, _probe()))


def test_dcp_checkpoint_exports(tmp_path: Path) -> None:
    model = _gpt2()
    run_dir = _train(tmp_path, model, "dcp")
    config = copy.deepcopy(model.config)  # a config built in code names no model class yet
    with pytest.raises(treadle.TreadleError, match="names no model class"):
        hf_export.export_pretrained(run_dir, tmp_path / "hf", config)
    config.architectures = ["GPT2LMHeadModel"]
    out = hf_export.export_pretrained(run_dir, tmp_path / "hf", config)
    assert torch.equal(_logits(_reload(out), _probe()), _logits(model, _probe()))


def test_hf_format_checkpoints_are_pretrained_folders_and_export_alone(tmp_path: Path) -> None:
    model = _gpt2()
    model.generation_config.max_new_tokens = 5  # carried through to the export
    run_dir = _train(tmp_path, model, "hf")
    ckpt = treadle_checkpoint.resolve(run_dir)
    assert (ckpt / "config.json").is_file() and (ckpt / "generation_config.json").is_file()
    assert treadle_checkpoint.verify(ckpt) == []  # the config files are in the manifest
    assert torch.equal(_logits(_reload(ckpt), _probe()), _logits(model, _probe()))

    # no model or config needed: the checkpoint names it
    tokenizer = _tiny_tokenizer()
    out = hf_export.export_pretrained(run_dir, tmp_path / "hf", tokenizer=tokenizer)
    assert torch.equal(_logits(_reload(out), _probe()), _logits(model, _probe()))
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 5
    from transformers import AutoTokenizer

    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    assert reloaded_tokenizer("w5 w7 nope")["input_ids"] == tokenizer("w5 w7 nope")["input_ids"]


def test_resume_from_hf_format(tmp_path: Path) -> None:
    """The hf format is a full checkpoint format: training resumes from it."""
    model = _gpt2()
    run_dir = _train(tmp_path, model, "hf", steps=2)
    resumed = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = treadle.Run(
            model=resumed,
            train_data=token_batches(),
            config=treadle.Config(max_steps=2, output_dir=str(run_dir), resume="auto"),
            loggers=(),
            checkpoint="hf",
        )
        run.fit()
        run.close()
    assert run.state.step == 2
    assert torch.equal(_logits(resumed, _probe()), _logits(model, _probe()))


def test_command_line_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _gpt2()
    run_dir = _train(tmp_path, model)
    config_dir = tmp_path / "config"
    _gpt2(seed=3).save_pretrained(config_dir)  # a base model's folder: its weights are not used
    tokenizer_dir = tmp_path / "tok"
    _tiny_tokenizer().save_pretrained(tokenizer_dir)

    out = tmp_path / "hf"
    code = hf_export.main(
        ["export", str(run_dir), str(out), "--config", str(config_dir),
         "--tokenizer", str(tokenizer_dir)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (out / "tokenizer.json").is_file()
    assert torch.equal(_logits(_reload(out), _probe()), _logits(model, _probe()))

    assert hf_export.main(["export", str(run_dir), str(out)]) == 2  # exists already
    assert "already exists" in capsys.readouterr().err


def test_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    run_dir = _train(tmp_path, _gpt2())
    with pytest.raises(treadle.TreadleError, match=r"has no config\.json"):
        hf_export.export_pretrained(run_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_treadle_export_format_hf_from_the_command_line(tmp_path: Path) -> None:
    """`treadle export --format hf`: from an `hf` checkpoint as it is, and from a `safetensors`
    one with the model's config given as a format option."""
    from treadle import cli

    model = _gpt2()
    run_dir = _train(tmp_path, model)
    config_dir = tmp_path / "config"
    model.config.architectures = [type(model).__name__]  # as save_pretrained writes it
    model.config.save_pretrained(config_dir)
    out = tmp_path / "hf"
    args = [
        "export",
        str(run_dir),
        str(out),
        "--format",
        "hf",
        "--option",
        f"config='{config_dir}'",
    ]
    assert cli.main(args) == 0
    assert {"config.json", "model.safetensors", "state.json", "manifest.json"} <= {
        p.name for p in out.iterdir()
    }
    assert treadle_checkpoint.verify(out) == []
    assert torch.equal(_logits(_reload(out), _probe()), _logits(model, _probe()))
    # without a config, a safetensors checkpoint cannot say which model it holds
    assert cli.main(["export", str(run_dir), str(tmp_path / "none"), "--format", "hf"]) == 2
    assert not (tmp_path / "none").exists() and not (tmp_path / ".none.tmp").exists()

    hf_model = _gpt2(seed=1)
    hf_run = _train(tmp_path / "second", hf_model, checkpoint="hf")
    out = tmp_path / "hf-from-hf"
    assert cli.main(["export", str(hf_run), str(out), "--format", "hf"]) == 0
    assert torch.equal(_logits(_reload(out), _probe()), _logits(hf_model, _probe()))


def test_hf_format_refuses_a_plain_module_when_composed(tmp_path: Path) -> None:
    with pytest.raises(treadle.ConfigError, match="PreTrainedModel"):
        treadle.Run(
            model=torch.nn.Linear(2, 2),
            config=treadle.Config(max_steps=1, output_dir=str(tmp_path / "r")),
            loggers=(),
            checkpoint="hf",
        )
