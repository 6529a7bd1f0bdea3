"""treadle's own commands: ``treadle run``, ``launch``, ``plugins``, ``export``, ``plot`` and
``demo``, each a ``treadle.command`` entry point declared in pyproject.toml exactly as a third
party declares one (``treadle.cli`` names none of them). A command is a callable taking the
arguments after its name and returning the exit code; the first paragraph of its docstring is
its line in ``treadle --help``. ``runfile`` is the run-file loader ``treadle run`` uses.

Nothing is imported here: ``treadle plugins`` imports only its own module.
"""
