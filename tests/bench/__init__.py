"""treadle's benchmark suite: the kernel against a bare PyTorch loop and against its peers.

Run it with ``python -m tests.bench`` (``--quick`` for a short, indicative run; ``--help`` for
every option) or ``nox -s bench``. The method follows PyTorch's dynamo benchmark runner: each
measurement runs in a fresh single-threaded process, the contenders of a workload run
alternately (bare, treadle, ..., bare, treadle, ...) so that a change of machine load touches
all of them alike, the first steps are discarded as warm-up, and medians with interquartile
ranges are reported, together with each contender's ratio to the bare loop measured in the same
round. ``docs/performance.md`` describes the method and keeps the latest table.

Modules:
    workloads: the models and data (built from config, no download).
    contenders: one training loop per contender (bare loop, treadle, HF Trainer, Lightning).
    worker: the child process that runs one contender on one workload and reports JSON.
    runner: the command line, the alternation, the statistics and the CSV / Markdown output.
    cuda: the GPU variant (GPT-2 124M, bf16-mixed, tokens/s and model FLOPs utilisation).
    profile: where a contender's time goes (cProfile, or instruction counts under valgrind).

This package is not collected by the default test run (``norecursedirs`` in pyproject.toml):
timings are never asserted in CI.
"""
