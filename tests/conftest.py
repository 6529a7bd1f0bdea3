"""Shared fixtures: tiny models and data, fake installed distributions."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import toy  # noqa: E402  (tests/fixtures/toy.py: models and data shared with subprocess tests)


@pytest.fixture
def regression() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """A linear model returning {"loss"} and 8 batches of a learnable regression task."""
    torch.manual_seed(0)
    return toy.model(), toy.train_data()


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """Make a distribution visible to importlib.metadata without pip: a .dist-info on sys.path.

    ``fake_dist("acme", {"treadle.plugin": {"acme": "acme_mod"}}, modules={"acme_mod": "..."})``
    """
    from treadle import registry

    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))

    def make(
        name: str,
        entry_points: dict[str, dict[str, str]],
        modules: dict[str, str] | None = None,
        version: str = "1.0",
        requires: list[str] | None = None,
    ) -> Path:
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        requirements = "".join(f"Requires-Dist: {line}\n" for line in requires or [])
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{requirements}"
        )
        lines = []
        for group, points in entry_points.items():
            lines.append(f"[{group}]")
            lines += [f"{key} = {value}" for key, value in points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for module, source in (modules or {}).items():
            (root / f"{module}.py").write_text(textwrap.dedent(source))
        registry.refresh()
        return info

    yield make
    registry.refresh()
