"""One run per output directory: the lock file refuses a second run and outlives no process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import toy

import treadle
from treadle.errors import TreadleError, TreadleWarning
from treadle.plugins.checkpoint import lock

# Takes the lock on argv[1], says so, and holds it until its stdin closes (or it is killed).
_HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from treadle.plugins.checkpoint import lock
    held = lock.acquire(Path(sys.argv[1]))
    print("ready", flush=True)
    sys.stdin.read()
    held.release()
    """
)


def _run(out: Path, **config: Any) -> treadle.Run:
    return treadle.Run(
        toy.model(),
        toy.train_data(n=16),
        config=treadle.Config(max_steps=2, log_every=1, output_dir=str(out), **config),
        loggers=["jsonl"],
    )


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock on tmp_path/out."""
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path / "out")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def _dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    return int(finished.stdout)


@pytest.mark.timeout(120)
def test_a_run_held_by_another_process_is_refused_naming_it(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    out = tmp_path / "out"
    run = _run(out)
    with pytest.raises(TreadleError) as info:
        run.fit()
    message = str(info.value)
    assert f"PID {holder.pid}" in message
    assert socket.gethostname() in message
    assert str(out / lock.LOCK_NAME) in message
    assert "another Config.output_dir" in message
    assert run.state.step == 0 and not (out / "metrics.jsonl").exists()  # nothing written
    with pytest.raises(TreadleError, match=f"PID {holder.pid}"):
        run.save()  # a save writes checkpoints too
    # once the holder is done, the same run trains
    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait() == 0
    assert not (out / lock.LOCK_NAME).exists()
    assert run.fit().step == 2


@pytest.mark.timeout(120)
def test_the_lock_of_a_killed_process_is_taken_over(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    out = tmp_path / "out"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / lock.LOCK_NAME).exists()  # left behind: nobody removed it
    with pytest.warns(TreadleWarning, match=f"taking over the lock .*PID {holder.pid} on host"):
        state = _run(out).fit()
    assert state.step == 2
    assert not (out / lock.LOCK_NAME).exists()


def test_a_stale_lock_file_naming_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    pid = _dead_pid()
    stale = {"pid": pid, "host": socket.gethostname(), "started": "then", "argv": ["x"]}
    (out / lock.LOCK_NAME).write_text(json.dumps(stale))
    with pytest.warns(TreadleWarning, match=f"PID {pid}"):
        assert _run(out).fit().step == 2


def test_without_flock_a_dead_pid_on_this_host_is_stale_and_a_live_one_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lock, "_flock", lambda fd: None)  # a file system without flock
    out = tmp_path / "out"
    out.mkdir()
    path = out / lock.LOCK_NAME
    here = socket.gethostname()
    path.write_text(json.dumps({"pid": os.getppid(), "host": here, "started": "t", "argv": []}))
    with pytest.raises(TreadleError, match=f"PID {os.getppid()}"):
        lock.acquire(out)
    path.write_text(json.dumps({"pid": os.getppid(), "host": "elsewhere", "argv": []}))
    with pytest.raises(TreadleError, match="host elsewhere"):
        lock.acquire(out)  # a holder on another host is never presumed dead
    path.write_text(json.dumps({"pid": _dead_pid(), "host": here, "argv": []}))
    with pytest.warns(TreadleWarning, match="taking over"):
        held = lock.acquire(out)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    held.release()
    assert not path.exists()


def test_a_second_run_started_inside_the_first_fit_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"

    class StartsAnother:
        @treadle.hookimpl
        def on_step_end(self) -> None:
            _run(out).fit()

    run = treadle.Run(toy.model(), toy.train_data(n=16), plugins=[StartsAnother()],
                      config=treadle.Config(max_steps=2, output_dir=str(out)))  # fmt: skip
    with pytest.raises(TreadleError, match=rf"PID {os.getpid()} \(this process"):
        run.fit()
    assert not (out / lock.LOCK_NAME).exists()  # released although fit failed


def test_sequential_runs_on_one_directory_and_a_save_inside_fit_work(tmp_path: Path) -> None:
    out = tmp_path / "out"

    class SavesInside:
        @treadle.hookimpl
        def on_step_end(self, run: treadle.Run) -> None:
            run.save()  # re-entrant: this run already holds the lock

    first = treadle.Run(toy.model(), toy.train_data(n=16), plugins=[SavesInside()],
                        config=treadle.Config(max_steps=2, output_dir=str(out)))  # fmt: skip
    assert first.fit().step == 2
    assert first.fit(max_steps=3).step == 3
    resumed = _run(out, resume="auto")
    assert resumed.fit(max_steps=4).step == 4
    assert _run(tmp_path / "other").fit().step == 2
    assert not (out / lock.LOCK_NAME).exists()


def test_a_lock_file_that_is_a_symlink_is_refused_and_not_followed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (out / lock.LOCK_NAME).symlink_to(outside)
    with pytest.raises(TreadleError, match="symbolic link"):
        _run(out).fit()
    assert outside.read_text() == "precious"


@pytest.mark.timeout(120)
def test_only_the_main_process_locks(
    tmp_path: Path, holder: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run(tmp_path / "out", save_at_end=False)
    monkeypatch.setattr(treadle.Run, "is_main_process", property(lambda self: False))
    assert run.fit().step == 2  # a rank other than 0 leaves the lock to rank 0
