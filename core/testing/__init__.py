"""Test kits for treadle components, first-party or a third party's, one module per kind.

Each kind has a conformance suite, a class a plugin's test module subclasses (pytest collects
its ``test_`` methods), naming the component under test in a class attribute::

    from treadle.testing import LoggerConformance

    class TestMyLogger(LoggerConformance):
        logger = MyLogger            # a class or factory, an entry-point name or a mapping

=====================  ======================  ===========================================
suite                  class attribute         module
=====================  ======================  ===========================================
StrategyConformance    ``strategy``            :mod:`treadle.testing.strategy` (processes)
PrecisionConformance   ``precision``           :mod:`treadle.testing.precision`
OptimizerConformance   ``optimizer``           :mod:`treadle.testing.optimizer`
SchedulerConformance   ``scheduler``           :mod:`treadle.testing.scheduler`
LoggerConformance      ``logger``              :mod:`treadle.testing.logger`
CheckpointConformance  ``checkpoint``          :mod:`treadle.testing.checkpoint`
StoreConformance       ``store``               :mod:`treadle.testing.store`
CallbackConformance    ``plugin``              :mod:`treadle.testing.callback`
=====================  ======================  ===========================================

Every suite trains the same tiny model (:class:`TinyModel` on :func:`tiny_data`, on CPU) and
ends with the house rule: a run stopped, saved and resumed ends with the weights of the
uninterrupted run, bit for bit. A check a component cannot support is skipped by overriding
its method in the subclass.

The multi-process harness the strategy suite runs on, :func:`run_distributed` and
:func:`run_isolated`, serves any test that needs several ranks
(:mod:`treadle.testing.processes`).

Run by ``python -m treadle.testing WORKDIR RANK``, this package is one rank of a
``run_distributed`` call.
"""

from treadle.testing.callback import CallbackConformance
from treadle.testing.checkpoint import CheckpointConformance
from treadle.testing.logger import LoggerConformance
from treadle.testing.models import TinyBlock, TinyModel, tiny_data
from treadle.testing.optimizer import OptimizerConformance
from treadle.testing.precision import PrecisionConformance
from treadle.testing.processes import WorkerFailed, free_port, run_distributed, run_isolated
from treadle.testing.scheduler import SchedulerConformance
from treadle.testing.store import StoreConformance
from treadle.testing.strategy import (
    REFERENCE,
    StrategyConformance,
    check_agreed_stop,
    check_checkpoint_roundtrip,
    check_eval_gather,
    check_loss_parity,
    check_no_sync,
)

__all__ = [
    "REFERENCE",
    "CallbackConformance",
    "CheckpointConformance",
    "LoggerConformance",
    "OptimizerConformance",
    "PrecisionConformance",
    "SchedulerConformance",
    "StoreConformance",
    "StrategyConformance",
    "TinyBlock",
    "TinyModel",
    "WorkerFailed",
    "check_agreed_stop",
    "check_checkpoint_roundtrip",
    "check_eval_gather",
    "check_loss_parity",
    "check_no_sync",
    "free_port",
    "run_distributed",
    "run_isolated",
    "tiny_data",
]
