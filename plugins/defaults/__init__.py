"""What every run starts with, registered ``trylast`` so that any plugin's implementation wins.

``treadle.Run`` registers this plugin by its entry-point name (``defaults``) before any other,
so it is never named in ``plugins=``; the kernel calls one of its hooks directly while it is the
hook's only implementation. Two modules:

- ``providers``: the loss from the model's outputs or ``loss_fn``; the training, evaluation and
  prediction steps; the loaders built from ``train_data`` and ``eval_data``; the optimizer and
  scheduler built from the run's specs. A plugin replaces one by implementing the same hook.
- ``guards``: SIGTERM and SIGINT during ``fit`` become a preemption (``run.preempt``: the step
  finishes, every rank saves and stops), and the warnings about what would otherwise go
  unnoticed: a non-finite training loss, batching options a ready DataLoader ignores, a
  ``keep_best`` metric never logged.

The helpers other plugins use are importable from here.
"""

from treadle.plugins.defaults.guards import (
    check_monitor,
    discard_output,
    on_exception,
    on_fit_begin,
    on_fit_end,
    on_init_end,
    on_log,
    report,
)
from treadle.plugins.defaults.providers import (
    backward_value,
    compute_loss,
    describe_value,
    eval_step,
    forward,
    labels_of,
    loss_error,
    loss_from_outputs,
    make_eval_loader,
    make_optimizer,
    make_scheduler,
    make_train_loader,
    predict_step,
    predictions_of,
    training_step,
    with_sampler,
)

__all__ = [
    "backward_value", "check_monitor", "compute_loss", "describe_value", "discard_output",
    "eval_step", "forward", "labels_of", "loss_error", "loss_from_outputs", "make_eval_loader",
    "make_optimizer", "make_scheduler", "make_train_loader", "on_exception", "on_fit_begin",
    "on_fit_end", "on_init_end", "on_log", "predict_step", "predictions_of", "report",
    "training_step", "with_sampler",
]  # fmt: skip
