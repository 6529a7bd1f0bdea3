"""One run at a time per output directory: a lock file the main process holds while it writes.

``OUTPUT/.treadle.lock`` holds JSON naming its holder (``pid``, ``host``, ``started``, ``argv``).
It is held with ``fcntl.flock`` on an open descriptor, which the operating system releases when
the process ends, however it ends: a lock file that nobody holds was left by a dead process,
and is taken over with a warning. The holder removes the file when it is done.

Where ``flock`` is not available (Windows, a file system that refuses it), the file is created
with ``O_EXCL`` instead; then a holder is presumed dead only when it ran on this host and its
PID no longer exists, never when it ran on another host.

Network file systems: NFS (v4, or v3 with lockd) carries ``flock`` between hosts on Linux, so
runs on two hosts exclude each other. A mount that keeps ``flock`` local to each host (some
Lustre and CIFS set-ups) protects only the runs started on the same host.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from treadle.errors import TreadleError, TreadleWarning

__all__ = ["LOCK_NAME", "OutputLock", "acquire"]

LOCK_NAME = ".treadle.lock"
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a planted link never redirects the lock's writes
_ATTEMPTS = 5  # each retry means another process released or took the lock in between


class OutputLock:
    """A held lock; ``release()`` removes the file and lets the next run in."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):  # never remove a successor's lock file
                self.path.unlink()
        except OSError:
            pass  # the lock is released by closing; a file left behind is taken over later
        finally:
            os.close(self._fd)
            self._fd = None


def acquire(directory: Path) -> OutputLock:
    """Lock ``directory`` for this process, or raise a ``TreadleError`` naming the holder."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TreadleError(
            f"cannot create the output directory {directory}: {exc.strerror or exc}"
        ) from None
    path = directory / LOCK_NAME
    for _ in range(_ATTEMPTS):
        fd = _open(path, os.O_RDWR | os.O_CREAT)
        try:
            locked = _flock(fd)
        except BaseException:
            os.close(fd)
            raise
        if locked is None:  # flock unavailable here
            os.close(fd)
            return _acquire_exclusive(path)
        if not locked:
            holder = _read(fd)
            os.close(fd)
            raise _refused(path, holder)
        if not _same_file(fd, path):  # its holder removed it between our open and our lock
            os.close(fd)
            continue
        previous = _read(fd)
        if previous:
            _warn_takeover(path, previous)
        _write(fd, _me())
        return OutputLock(path, fd)
    raise TreadleError(f"could not lock {path}: other runs keep taking and releasing it")


def _acquire_exclusive(path: Path) -> OutputLock:
    for _ in range(_ATTEMPTS):
        try:
            fd = _open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            holder = _read_path(path)
            if holder.get("host") != socket.gethostname() or _alive(holder.get("pid")):
                raise _refused(path, holder) from None
            _warn_takeover(path, holder)
            path.unlink(missing_ok=True)
            continue
        _write(fd, _me())
        return OutputLock(path, fd)
    raise TreadleError(f"could not lock {path}: other runs keep taking and releasing it")


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | _NO_FOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TreadleError(
                f"{path} is a symbolic link; treadle never follows a link out of the output "
                "directory. Remove it."
            ) from None
        if isinstance(exc, FileExistsError):
            raise
        raise TreadleError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None


def _flock(fd: int) -> bool | None:
    """True: locked; False: held by someone else; None: this system cannot ``flock``."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _me() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": list(sys.argv),
    }


def _write(fd: int, holder: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def _read(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 65536, 0)
        holder = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"unreadable": True}
    return holder if isinstance(holder, dict) else {"unreadable": True}


def _read_path(path: Path) -> dict[str, Any]:
    try:
        fd = _open(path, os.O_RDONLY)
    except (TreadleError, FileNotFoundError):
        return {}
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but belongs to someone else
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    if not holder or holder.get("unreadable"):
        return "a run whose lock file cannot be read"
    pid = holder.get("pid")
    this = " (this process: another Run is inside fit)" if pid == os.getpid() else ""
    argv = " ".join(map(str, holder.get("argv") or [])) or "?"
    return (
        f"PID {pid}{this} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
        f", command: {argv}"
    )


def _refused(path: Path, holder: dict[str, Any]) -> TreadleError:
    return TreadleError(
        f"the output directory {path.parent} is in use by another run: {_describe(holder)} "
        f"(lock file {path}). Two runs writing one directory delete each other's checkpoints. "
        "Wait for that run to finish, stop it, or give this run another Config.output_dir. "
        "If you are sure no run uses the directory (e.g. its host is gone), delete the lock file."
    )


def _warn_takeover(path: Path, holder: dict[str, Any]) -> None:
    warnings.warn(
        f"taking over the lock {path} left by a run that is no longer running "
        f"({_describe(holder)})",
        TreadleWarning,
        stacklevel=4,
    )
