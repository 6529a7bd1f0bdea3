"""``python -m treadle.testing WORKDIR RANK``: one rank of a ``run_distributed`` call."""

import sys

from treadle.testing.processes import _worker_main

_worker_main(sys.argv[1:])
