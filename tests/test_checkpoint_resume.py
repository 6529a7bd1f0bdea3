"""Resume continues exactly; damaged checkpoints are detected and skipped; weights load for inference.

The reference is one uninterrupted run of 12 optimizer steps (shuffled DataLoader, dropout,
gradient accumulation 2, warm-up then cosine, AdamW); the same run stopped after a step and
resumed from its checkpoint in a new ``Run`` must match it bit for bit: weights, optimizer
state and every logged loss and learning rate.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import toy
from ckpt_runs import MAX_STEPS, assert_same_training, make_run
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import treadle
from treadle import checkpoint
from treadle.cli import main as cli_main
from treadle.errors import TreadleError, TreadleWarning


@pytest.mark.parametrize(
    ("stop_at", "epoch", "batch_in_epoch"),
    [(5, 1, 0), (7, 1, 4)],
    ids=["at-epoch-end", "mid-epoch"],
)
def test_resume_is_bit_exact(tmp_path: Path, stop_at: int, epoch: int, batch_in_epoch: int) -> None:
    reference = make_run(tmp_path / "full")
    reference[0].fit()
    assert len(reference[1].train) == MAX_STEPS

    first = make_run(tmp_path / "stopped", stop_at=stop_at)
    first[0].fit()
    assert first[0].state.step == stop_at
    saved = tmp_path / "stopped" / "checkpoints" / f"step-{stop_at:06d}"
    assert first[0].last_checkpoint == saved
    meta = json.loads((saved / "state.json").read_text())
    assert meta["format"] == "safetensors" and meta["step"] == stop_at
    assert meta["data"]["epoch"] == epoch and meta["data"]["batch_in_epoch"] == batch_in_epoch
    assert meta["data"]["sampler"]["seed"] == 3 and meta["data"]["batches_per_epoch"] == 10
    assert (tmp_path / "stopped" / "checkpoints" / "latest").read_text().strip() == saved.name

    second = make_run(tmp_path / "stopped", resume="auto")
    second[0].fit()
    assert second[1].started_at == stop_at
    assert_same_training(reference, [first, second])


def test_checkpoint_layout_and_manifest(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path, stop_at=3)
    run.fit()
    path = tmp_path / "checkpoints" / "step-000003"
    names = {p.name for p in path.iterdir()}
    expected = {
        "manifest.json", "state.json", "model.safetensors", "optimizer.json",
        "optimizer.safetensors", "scheduler.json", "precision.json", "plugins.json",
        "rng-rank00000.json",
    }  # fmt: skip
    assert names == expected
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert set(manifest) == expected - {"manifest.json"}
    assert manifest["model.safetensors"]["size"] == (path / "model.safetensors").stat().st_size
    assert len(manifest["state.json"]["sha256"]) == 64
    rng = json.loads((path / "rng-rank00000.json").read_text())
    assert set(rng) >= {"python", "numpy", "torch"}
    assert checkpoint.verify(path) == []
    # nothing temporary is left next to the checkpoints
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest", "step-000003"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_is_bit_exact_on_cuda_with_its_generator(tmp_path: Path) -> None:
    from treadle.plugins.strategies.single import SingleDevice

    def cuda() -> SingleDevice:
        return SingleDevice(f"cuda:{torch.cuda.current_device()}")

    reference = make_run(tmp_path / "full", strategy=cuda())
    reference[0].fit()
    assert next(reference[0].model.parameters()).is_cuda
    first = make_run(tmp_path / "stopped", stop_at=7, strategy=cuda())
    first[0].fit()
    rng = tmp_path / "stopped" / "checkpoints" / "step-000007" / "rng-rank00000.json"
    assert "device" in json.loads(rng.read_text())  # dropout on the GPU draws from it
    second = make_run(tmp_path / "stopped", resume="auto", strategy=cuda())
    second[0].fit()
    assert_same_training(reference, [first, second])


def _fp16_mixed() -> Any:
    from treadle.plugins import precision

    for value in vars(precision).values():
        if (
            isinstance(value, type)
            and issubclass(value, treadle.Precision)
            and getattr(value, "name", None) == "fp16-mixed"
        ):
            return value
    pytest.skip("treadle.plugins.precision has no fp16-mixed class yet")


def test_resume_is_bit_exact_with_fp16_mixed(tmp_path: Path) -> None:
    fp16 = _fp16_mixed()

    def precision() -> Any:
        # a huge first scale overflows (steps skipped, scale halved) and a short growth
        # interval grows it again: the scaler's state changes, so it must be restored
        return fp16(init_scale=2.0**24, growth_interval=2)

    try:
        reference = make_run(tmp_path / "full", precision=precision())
        reference[0].fit()
    except treadle.ConfigError as exc:
        pytest.skip(f"fp16-mixed is not usable on this device: {exc}")
    assert reference[0].state.skipped_steps > 0  # the scaler did act

    first = make_run(tmp_path / "stopped", stop_at=7, precision=precision())
    first[0].fit()
    saved = json.loads(
        (tmp_path / "stopped" / "checkpoints" / "step-000007" / "precision.json").read_text()
    )
    assert saved["value"], "the scaler's state is in the checkpoint"
    second = make_run(tmp_path / "stopped", resume="auto", precision=precision())
    second[0].fit()
    assert_same_training(reference, [first, second])
    assert second[0].state.skipped_steps == reference[0].state.skipped_steps


def test_mid_epoch_resume_skips_without_reading(tmp_path: Path) -> None:
    class Counting(toy.Pairs):
        def __init__(self) -> None:
            super().__init__(20)
            self.read: list[int] = []

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            self.read.append(index)
            return super().__getitem__(index)

    def data() -> DataLoader[Any]:
        return DataLoader(Counting(), batch_size=2, shuffle=True)

    full_data, stopped_data, resumed_data = data(), data(), data()
    make_run(tmp_path / "full", train_data=full_data)[0].fit()
    make_run(tmp_path / "stopped", stop_at=7, train_data=stopped_data)[0].fit()
    make_run(tmp_path / "stopped", resume="auto", train_data=resumed_data)[0].fit()
    # steps 1-7 read 28 samples; the resumed run reads exactly the rest, in the same order
    assert stopped_data.dataset.read == full_data.dataset.read[:28]
    assert resumed_data.dataset.read == full_data.dataset.read[28:]


def test_mid_epoch_resume_of_a_plain_list_of_batches(tmp_path: Path) -> None:
    def batches() -> list[dict[str, torch.Tensor]]:
        return toy.train_data(n=40, batch_size=4)  # 10 batches, no sampler to skip with

    reference = make_run(tmp_path / "full", train_data=batches())
    reference[0].fit()
    first = make_run(tmp_path / "stopped", stop_at=7, train_data=batches())
    first[0].fit()
    second = make_run(tmp_path / "stopped", resume="auto", train_data=batches())
    second[0].fit()
    assert_same_training(reference, [first, second])


class Stateful:
    """A plugin with state of its own: a counter and a tensor (say, an EMA of the weights)."""

    name = "stateful"

    def __init__(self) -> None:
        self.steps = 0
        self.ema: torch.Tensor | None = None
        self.loaded: dict[str, Any] | None = None

    @treadle.hookimpl
    def on_step_end(self, run: treadle.Run) -> None:
        self.steps += 1
        weight = run.model.net[0].weight.detach()
        self.ema = weight.clone() if self.ema is None else 0.9 * self.ema + 0.1 * weight

    @treadle.hookimpl
    def on_save_checkpoint(self, plugin_state: dict[str, Any]) -> None:
        plugin_state[self.name] = {"steps": self.steps, "ema": self.ema, "note": ("a", 1)}

    @treadle.hookimpl
    def on_load_checkpoint(self, plugin_state: Mapping[str, Any]) -> None:
        self.loaded = dict(plugin_state[self.name])
        self.steps, self.ema = self.loaded["steps"], self.loaded["ema"]


def test_plugin_state_round_trips_with_tensors(tmp_path: Path) -> None:
    saver = Stateful()
    make_run(tmp_path, stop_at=4, plugins=(saver,))[0].fit()
    loader = Stateful()
    make_run(tmp_path, resume="auto", plugins=(loader,), max_steps=4)[0].fit()
    assert loader.loaded is not None and loader.loaded["steps"] == 4
    assert loader.loaded["note"] == ("a", 1)
    # tensors come back on CPU, whatever device they were saved from
    assert saver.ema is not None and torch.equal(loader.loaded["ema"], saver.ema.cpu())
    assert (tmp_path / "checkpoints" / "step-000004" / "plugins.safetensors").is_file()


# ------------------------------------------------------------------ damaged checkpoints


def two_checkpoints(out: Path) -> Path:
    """A run that saved at steps 2 and 4; returns the directory of checkpoints."""
    make_run(out, save_every=2, max_steps=4)[0].fit()
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000002", "step-000004"]
    return root


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def alter(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size, one byte changed: only the checksum can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [
        (truncate, "model.safetensors", "truncated"),
        (alter, "optimizer.safetensors", "altered"),
        (alter, "state.json", "altered"),
        (lambda p: p.unlink(), "rng-rank00000.json", "missing"),
        (lambda p: p.unlink(), "manifest.json", "manifest"),
    ],
    ids=["truncated-weights", "altered-optimizer", "altered-state", "missing-rng", "no-manifest"],
)
def test_damaged_latest_falls_back_to_the_previous(
    tmp_path: Path, damage: Any, file: str, problem: str
) -> None:
    root = two_checkpoints(tmp_path)
    damage(root / "step-000004" / file)
    assert checkpoint.verify(root / "step-000002") == []
    problems = checkpoint.verify(root / "step-000004")
    assert problems and file in problems[0] and problem in problems[0]

    run, recorder = make_run(tmp_path, resume="auto", max_steps=4)
    with pytest.warns(TreadleWarning, match=rf"step-000004.*{re.escape(file)}.*previous"):
        run.fit()
    assert recorder.started_at == 2  # resumed from step 2, not 4 and not from scratch
    assert run.last_checkpoint == root / "step-000004"  # re-saved whole at the end
    assert checkpoint.verify(root / "step-000004") == []


def test_explicit_damaged_path_is_an_error_and_all_damaged_is_too(tmp_path: Path) -> None:
    root = two_checkpoints(tmp_path)
    truncate(root / "step-000004" / "model.safetensors")
    run, _ = make_run(tmp_path, resume=str(root / "step-000004"))
    with pytest.raises(TreadleError, match=r"cannot resume from .*model\.safetensors.*truncated"):
        run.fit()
    alter(root / "step-000002" / "state.json")
    run, _ = make_run(tmp_path, resume="auto")
    with (
        pytest.raises(TreadleError, match=r"every checkpoint .* is damaged"),
        pytest.warns(TreadleWarning),
    ):
        run.fit()


def test_resume_from_a_path_and_from_nothing(tmp_path: Path) -> None:
    root = two_checkpoints(tmp_path / "a")
    run, recorder = make_run(tmp_path / "b", resume=str(root / "step-000002"), max_steps=4)
    run.fit()
    assert recorder.started_at == 2
    run, recorder = make_run(tmp_path / "c", resume=str(tmp_path / "a"), max_steps=6)
    run.fit()
    assert recorder.started_at == 4  # a run's output directory: its newest valid checkpoint
    run, recorder = make_run(tmp_path / "fresh", resume="auto", max_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.fit()
    assert recorder.started_at == 0


# ------------------------------------------------------------------ weights for inference


def test_load_weights_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = make_run(tmp_path / "run", max_steps=3)
    run.fit()
    trained = {k: v.cpu() for k, v in run.model.state_dict().items()}

    def fresh() -> torch.nn.Module:
        torch.manual_seed(1)
        return toy.model(width=8, dropout=0.2)

    for where in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-000003"):
        model = fresh()
        result = treadle.load_weights(model, where)
        assert not result.missing_keys and not result.unexpected_keys
        assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())

    out = tmp_path / "exported"
    assert cli_main(["export", str(tmp_path / "run"), str(out)]) == 0
    assert "step-000003" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "state.json", "manifest.json"}
    weights = load_file(out / "model.safetensors")  # a plain safetensors file, HF layout
    assert all(torch.equal(weights[k], v) for k, v in trained.items())
    model = fresh()
    treadle.load_weights(model, out)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())

    # an export holds no training state; the folder must be new; damage is refused
    exported_run, _ = make_run(tmp_path / "other", resume=str(out))
    with pytest.raises(TreadleError, match="weights only"):
        exported_run.fit()
    assert cli_main(["export", str(tmp_path / "run"), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    alter(out / "model.safetensors")
    with pytest.raises(TreadleError, match=r"model\.safetensors: altered"):
        treadle.load_weights(fresh(), out)
    with pytest.raises(TreadleError, match="not a checkpoint"):
        treadle.load_weights(fresh(), tmp_path / "nothing-here")


def test_load_weights_reports_a_mismatched_model(tmp_path: Path) -> None:
    make_run(tmp_path, max_steps=3)[0].fit()
    with pytest.raises(TreadleError):
        treadle.load_weights(toy.model(width=4), tmp_path)
    bigger = toy.model(width=8)
    bigger.extra = torch.nn.Linear(2, 2)
    result = treadle.load_weights(bigger, tmp_path, strict=False)
    assert sorted(result.missing_keys) == ["extra.bias", "extra.weight"]


def test_the_example_in_docs_checkpoints_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (Path(__file__).parents[1] / "docs" / "checkpoints.md").read_text()
    example = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the second run resumes from the end and has nothing left to do
        exec(compile(example, "docs/checkpoints.md", "exec"), {"__name__": "example"})
    root = tmp_path / "runs" / "ckpt-demo" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000030", "step-000040"]
    assert cli_main(["export", "runs/ckpt-demo", "runs/ckpt-demo-weights"]) == 0
    assert (tmp_path / "runs" / "ckpt-demo-weights" / "model.safetensors").is_file()
