"""Distribution strategies: one module each, found through the ``treadle.strategy`` group."""
