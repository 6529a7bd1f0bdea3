"""``python -m tests.bench``: the benchmark suite (``--help`` for the options)."""

from tests.bench.runner import main

raise SystemExit(main())
