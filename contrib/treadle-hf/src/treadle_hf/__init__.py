"""treadle-hf: Hugging Face users bring their models, ``TrainingArguments``, ``TrainerCallback``s,
datasets and LoRA adapters to treadle unchanged.

Installing it is enough for ``treadle.Run(..., plugins=[SomeTrainerCallback()])`` to work (an
adapter found through the ``treadle.adapter`` entry point); the rest is imported by name.
"""

from treadle_hf.arguments import from_training_arguments
from treadle_hf.export import export_pretrained

__all__ = ["export_pretrained", "from_training_arguments"]
__version__ = "0.1.0"
