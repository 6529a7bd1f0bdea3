"""The checkpoint-format conformance suite: ``class TestMine(CheckpointConformance): checkpoint =
Mine``.

It checks that the format writes and reads back named tensors of several dtypes and shapes
exactly (the files it reports exist), model weights, an export a second reader can load, the
methods its ``sharded`` flag promises, and that a run saving with it resumes bit for bit.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from treadle.components import CheckpointFormat
from treadle.testing._fit import check_resume_exact, fresh, required, scratch
from treadle.testing.models import TinyModel

__all__ = ["CheckpointConformance"]


def _build(spec: Any) -> CheckpointFormat:
    from treadle.registry import component as build

    component = build("checkpoint", fresh(spec), CheckpointFormat)
    assert isinstance(component, CheckpointFormat)
    return component


def _sample() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "matrix": torch.randn(3, 4, generator=generator),
        "vector.bf16": torch.randn(5, generator=generator).to(torch.bfloat16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 2),
    }


def _assert_equal(
    loaded: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str
) -> None:
    assert set(loaded) == set(expected), (
        f"{what}: read back {sorted(loaded)}, wrote {sorted(expected)}"
    )
    for name, tensor in expected.items():
        got = loaded[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, (
            f"{what}: {name} came back {got.dtype} {tuple(got.shape)}, "
            f"was {tensor.dtype} {tuple(tensor.shape)}"
        )
        assert torch.equal(got.cpu(), tensor), f"{what}: {name} came back with other values"


def _assert_files(directory: Path, files: Any, what: str) -> None:
    assert isinstance(files, list) and files, f"{what} must return the file names it wrote"
    for name in files:
        assert (directory / name).exists(), f"{what} returned {name!r}, which does not exist"


def _overrides(fmt: CheckpointFormat, method: str) -> bool:
    return inspect.getattr_static(type(fmt), method) is not inspect.getattr_static(
        CheckpointFormat, method
    )


class CheckpointConformance:
    """Subclass it in a test module; pytest collects every ``test_`` method.

    Class attributes:
        checkpoint: the format: a class or zero-argument factory, an entry-point name, or a
            ``{"name": ..., **options}`` mapping.
        exports_loadable: an export can be read back with ``load_model`` of the same format
            (``True``); set False for a format whose exports are meant for another reader.
    """

    checkpoint: ClassVar[Any] = None
    exports_loadable: ClassVar[bool] = True

    def _new(self) -> CheckpointFormat:
        return _build(required(self, "checkpoint"))

    def test_is_a_format_with_a_name(self) -> None:
        fmt = self._new()
        assert isinstance(fmt, CheckpointFormat), f"{fmt!r} is not a treadle.CheckpointFormat"
        assert isinstance(fmt.name, str) and fmt.name, "set the class attribute name"

    def test_tensors_round_trip(self) -> None:
        fmt, tensors = self._new(), _sample()
        with scratch() as directory:
            files = fmt.save_tensors(directory, "optimizer", tensors)
            _assert_files(directory, files, "save_tensors")
            _assert_equal(fmt.load_tensors(directory, "optimizer"), tensors, "save/load_tensors")

    def test_model_round_trip(self) -> None:
        fmt = self._new()
        torch.manual_seed(0)
        model = TinyModel()
        state = model.state_dict()
        with scratch() as directory:
            files = fmt.save_model(directory, model, state)
            _assert_files(directory, files, "save_model")
            _assert_equal(fmt.load_model(directory, TinyModel()), state, "save/load_model")

    def test_export(self) -> None:
        fmt = self._new()
        torch.manual_seed(0)
        state = TinyModel().state_dict()
        with scratch() as root:
            source, out = root / "checkpoint", root / "export"
            source.mkdir()
            out.mkdir()
            fmt.save_model(source, TinyModel(), state)
            files = fmt.export_model(source, out, state)
            _assert_files(out, files, "export_model")
            if self.exports_loadable:
                _assert_equal(fmt.load_model(out, TinyModel()), state, "export_model")

    def test_sharded_flag_matches_the_methods(self) -> None:
        fmt = self._new()
        if fmt.sharded:
            missing = [m for m in ("save_sharded", "load_sharded") if not _overrides(fmt, m)]
            assert not missing, f"sharded = True, but {missing} are not implemented"
            tensors = {"weight": torch.randn(4, 3), "bias": torch.randn(3)}
            with scratch() as directory:
                fmt.save_sharded(directory, "model", tensors)
                template = {k: torch.zeros_like(v) for k, v in tensors.items()}
                loaded = fmt.load_sharded(directory, "model", template)
                _assert_equal(loaded, tensors, "save/load_sharded (one process)")
        else:
            missing = [m for m in ("save_tensors", "load_tensors") if not _overrides(fmt, m)]
            assert not missing, f"{missing} are not implemented"

    def test_resumes_bit_for_bit(self) -> None:
        spec = required(self, "checkpoint")
        check_resume_exact(lambda: {"checkpoint": fresh(spec)})
