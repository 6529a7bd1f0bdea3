"""`pip install treadle-hf` is all a user does: a script that imports nothing from treadle-hf
passes a `TrainerCallback` in `plugins=` and it runs.

The wheel is built from this distribution's source and installed into a fresh virtual
environment. That environment sees the packages of the one running the tests (torch,
transformers, treadle) through a `.pth` file adding a filtered copy of its site-packages,
in which treadle-hf itself is left out. So before the install the script must fail with
treadle's error naming the fix, and after it the same script must train with the callback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1]

SCRIPT = """
import torch, transformers, treadle

class CountSteps(transformers.TrainerCallback):
    steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        CountSteps.steps += 1

torch.manual_seed(0)
config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
model = transformers.GPT2LMHeadModel(config)
ids = torch.randint(0, 50, (4, 8, 12))
batches = [{"input_ids": row, "labels": row} for row in ids]
run = treadle.Run(model, batches, loggers=[], checkpoint=None, plugins=[CountSteps()],
                  config=treadle.Config(max_steps=3, output_dir="out"))
run.fit()
print("callback steps:", CountSteps.steps)
"""


def _filtered_site_packages(target: Path) -> Path:
    """Links to every entry of this environment's site-packages except treadle-hf's files."""
    target.mkdir()
    purelib = Path(sysconfig.get_paths()["purelib"])
    for entry in purelib.iterdir():
        name = entry.name.lower().replace("-", "_")
        if name.startswith(("treadle_hf", "__editable___treadle_hf", "__editable__.treadle_hf")):
            continue
        (target / entry.name).symlink_to(entry)
    return target


def _run(python: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(python), "-c", SCRIPT], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.timeout(600)
def test_installing_the_wheel_makes_trainer_callbacks_work_without_an_import(
    tmp_path: Path,
) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(SOURCE)],
        check=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("treadle_hf-*.whl")

    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    python = env_dir / "bin" / "python"
    fresh_purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    borrowed = _filtered_site_packages(tmp_path / "borrowed")
    # addsitedir, not a bare path: the borrowed .pth files (editable installs) must run too
    (Path(fresh_purelib) / "borrowed.pth").write_text(
        f"import site; site.addsitedir({str(borrowed)!r})\n"
    )

    before = _run(python, tmp_path)
    assert before.returncode != 0, before.stdout
    assert "install the treadle adapter package" in before.stderr, before.stderr[-2000:]

    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    after = _run(python, tmp_path)
    assert after.returncode == 0, after.stderr[-3000:]
    assert "callback steps: 3" in after.stdout
