"""Development sessions. Every install passes ``-c constraints.txt`` (torch pinned to CPU)."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.default_venv_backend = "venv"
CONSTRAINTS = ("-c", "constraints.txt")


def install(session: nox.Session, *args: str) -> None:
    session.install(*CONSTRAINTS, *args)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (what CI runs): unit, behaviour, multi-process and end-to-end tests."""
    install(session, "-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    install(session, "ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=False)
def shape(session: nox.Session) -> None:
    """The kernel's size and shape against its budget (tests/shape.py): code lines of core/,
    the length of ``fit``, nesting depth, no private attribute of ``Run`` used outside run.py."""
    session.run("python", "-m", "tests.shape")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the kernel, checked as the package ``treadle`` it is installed as."""
    install(session, "-e", ".", "mypy>=1.10")
    # core/ is the import package `treadle`; mypy cannot follow the editable install's import
    # hook, so it reads the package through a link named as it is imported
    tree = session.create_tmp()
    session.run("ln", "-sfn", f"{session.invoked_from}/core", f"{tree}/treadle", external=True)
    session.chdir(tree)
    session.run("mypy", "--config-file", f"{session.invoked_from}/pyproject.toml", "-p", "treadle")


@nox.session
def wheel(session: nox.Session) -> None:
    """Build the wheel, install it in a fresh venv (not editable) and smoke-test it."""
    install(session, "build")
    session.run("rm", "-rf", "dist", external=True)
    session.run("python", "-m", "build", "--wheel", "--outdir", "dist")
    wheels = sorted(__import__("glob").glob("dist/treadle-*.whl"))
    install(session, wheels[-1])
    session.chdir(session.create_tmp())  # away from the source tree, so the wheel is imported
    session.run("python", "-c", SMOKE)
    session.run("treadle", "plugins")


SMOKE = """
import importlib.metadata as md, treadle, treadle.plugins.strategies.single as single
assert "site-packages" in treadle.__file__, treadle.__file__
groups = {ep.group for ep in md.distribution("treadle").entry_points}
assert {"treadle.strategy", "treadle.optimizer", "treadle.logger", "treadle.plugin"} <= groups
from importlib import resources
assert resources.files("treadle").joinpath("py.typed").is_file()
import torch
run = treadle.Run(torch.nn.Linear(2, 1), [torch.ones(4, 2)], loss_fn=lambda out, batch: out.pow(2).mean(),
                  config=treadle.Config(max_steps=2, save_at_end=False), loggers=[])
run.fit()
assert run.state.step == 2
print("wheel smoke test ok:", treadle.__file__)
"""


@nox.session
def dist(session: nox.Session) -> None:
    """Only the multi-process tests (gloo, two processes on 127.0.0.1)."""
    install(session, "-e", ".[test]")
    session.run("python", "-m", "pytest", "-m", "multiprocess", *session.posargs)


@nox.session
def contrib(session: nox.Session) -> None:
    """Build each contrib/ distribution as a wheel, install it (not editable) and run its tests."""
    install(session, "-e", ".[test]")
    session.run("bash", ".ci/contrib", external=True)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite against the bare loop and the peers (tests/bench/, docs/performance.md).

    ``nox -s bench`` is the full CPU suite (tens of minutes, on a quiet machine);
    ``nox -s bench -- --quick`` an indicative one; ``nox -s bench -- --cuda`` the GPU variant.
    """
    install(session, "-e", ".[bench]")
    session.run("python", "-m", "tests.bench", *session.posargs, env={"OMP_NUM_THREADS": "1"})


@nox.session
def zoo(session: nox.Session) -> None:
    """torch.compile through treadle over Hugging Face architectures (tests/bench/zoo.py).

    ``nox -s zoo`` is the full zoo (about 20 minutes on one quiet CPU thread);
    ``nox -s zoo -- --quick`` a two-model smoke test; ``-- --models gpt2,llama`` a subset.
    """
    install(session, "-e", ".[bench]")
    session.run("python", "-m", "tests.bench.zoo", *session.posargs, env={"OMP_NUM_THREADS": "1"})


@nox.session
def docs(session: nox.Session) -> None:
    """Run every code example in docs/ and the README, then build the site strictly.

    The reference pages are generated from the code during the build (docs/_hooks/); the
    examples need the HF extra and treadle-hf (docs/migrating-from-hf.md).
    """
    install(session, "-e", ".[test,docs,hf]", "./contrib/treadle-hf")
    session.run(
        "python", "-m", "pytest", "tests/test_docs.py", "tests/test_docs_site.py",
        env={"TREADLE_DOCS_REQUIRE_ALL": "1"},
    )  # fmt: skip
    # `python -m`: the `mkdocs` script puts its folder, which holds the `treadle` command,
    # first on sys.path, where mkdocstrings takes it for the package
    session.run("python", "-m", "mkdocs", "build", "--strict", "--site-dir", session.create_tmp())
