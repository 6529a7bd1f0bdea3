"""First-party treadle plugins, discovered through the entry points in pyproject.toml."""
