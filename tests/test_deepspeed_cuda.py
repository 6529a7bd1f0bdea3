"""``deepspeed`` on a CUDA GPU: NCCL, one process, bf16 (skipped without CUDA or DeepSpeed).

Run where a GPU is at hand: ``python -m pytest -q tests/test_deepspeed_cuda.py``. Each test
starts one fresh process (``treadle.testing.run_distributed``) that joins an NCCL group of one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import ds_workers

from treadle import testing

pytestmark = [pytest.mark.cuda, pytest.mark.multiprocess]
TIMEOUT = 420.0


def _nccl(function: Any, *args: Any) -> Any:
    return testing.run_distributed(function, *args, world_size=1, backend="nccl", timeout=TIMEOUT)[
        0
    ]


def test_fp32_on_cuda_matches_one_cpu_process(tmp_path: Path) -> None:
    settings = {"max_steps": 6, "grad_accum_steps": 2, "batch_size": 8}
    with ds_workers.make_run("single", output_dir=str(tmp_path / "cpu"), **settings) as run:
        run.fit()
        expected = ds_workers.weights(run)
    result = _nccl(ds_workers.train, [{"stage": 2, "device": "cuda"}], settings, str(tmp_path))[0]
    assert result["world_size"] == 1 and result["step"] == 6
    for name, tensor in expected.items():  # CUDA's float32 kernels round differently from CPU's
        assert torch.allclose(result["weights"][name], tensor, atol=1e-4, rtol=1e-3), name


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_trains_and_resumes(tmp_path: Path, stage: int) -> None:
    options = {"stage": stage, "precision": "bf16", "device": "cuda"}
    settings = {"max_steps": 6, "scheduler": {"name": "linear", "warmup_steps": 2}}
    result = _nccl(ds_workers.roundtrip, options, settings, str(tmp_path), 3)
    assert result["begin"] == 3
    for name, whole in result["whole"].items():
        assert whole.dtype == torch.float32 and math.isfinite(float(whole.abs().sum())), name
        # the same kernels on the same data; only non-deterministic CUDA reductions may differ
        assert torch.allclose(result["resumed"][name], whole, atol=1e-6, rtol=1e-5), name
    start = ds_workers.weights_of_seed(0)
    assert any(not torch.equal(result["whole"][k], start[k]) for k in start)  # it trained
