"""Training techniques as plugins: each module is one technique, found by name like any plugin.

``compile``, ``activation-checkpointing``, ``ema``, ``neftune``, ``label-smoothing``,
``length-grouped-sampler``, ``auto-batch-size``, ``debug-overflow``, ``profiler``, ``lr-finder``.
None of them needed a change to the kernel: they use the hooks and public ``Run`` methods a
third-party package has.
"""
