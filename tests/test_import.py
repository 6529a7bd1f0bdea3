"""``import treadle`` stays light: no plugin module, no optional backend."""

from __future__ import annotations

import json
import subprocess
import sys

OPTIONAL_BACKENDS = [
    "deepspeed",
    "torch_xla",
    "torch_npu",
    "accelerate",
    "transformers",
    "tensorboard",
    "torch.utils.tensorboard",
    "mlflow",
    "wandb",
    "matplotlib",
    "tqdm",
    "safetensors",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint",
    "torch.nn.parallel.distributed",
]


def _modules_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_import_treadle_imports_no_plugin_and_no_optional_backend() -> None:
    modules = _modules_after("import treadle")
    assert "treadle" in modules and "treadle.run" in modules
    assert [m for m in modules if m.startswith("treadle.plugins")] == []
    # torch itself imports some of these (tqdm, DDP's module): judge only what treadle adds
    added = set(modules) - set(_modules_after("import torch"))
    assert sorted(m for m in OPTIONAL_BACKENDS if m in added) == []
    assert not [m for m in added if m.split(".")[0] in {"deepspeed", "torch_xla", "torch_npu"}]


def test_composing_a_run_imports_only_the_named_components() -> None:
    code = (
        "import toy, treadle\n"
        "treadle.Run(toy.model(), toy.train_data(), loggers=['jsonl'], checkpoint=None)"
    )
    modules = _modules_after(
        f"import sys; sys.path.insert(0, {str(__file__.rsplit('/', 1)[0] + '/fixtures')!r})\n{code}"
    )
    plugins = sorted(m for m in modules if m.startswith("treadle.plugins."))
    assert plugins == [
        "treadle.plugins.checkpoint",  # the store, "directory" by default, is a component too
        "treadle.plugins.checkpoint.directory",
        "treadle.plugins.checkpoint.files",
        "treadle.plugins.checkpoint.lock",
        "treadle.plugins.defaults",
        "treadle.plugins.defaults.guards",
        "treadle.plugins.defaults.providers",
        "treadle.plugins.loggers",
        "treadle.plugins.loggers.jsonl",
        "treadle.plugins.optimizers",
        "treadle.plugins.precision",
        "treadle.plugins.strategies",
        "treadle.plugins.strategies.single",
    ]
