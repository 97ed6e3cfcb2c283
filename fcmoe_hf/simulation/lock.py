"""An exclusive lock on a run directory, so that two runs (or a second `--resume` of a live run) cannot both proceed.

The lock is the file `run.lock` in the run directory, holding its holder (pid, host, start time, command line) as
JSON, and held with `fcntl.flock` for the holder's lifetime: the kernel releases it when the holder exits or is
killed, so a lock left by a dead process on this host is detected as stale and taken over (with a warning). A lock
recorded by another host is never taken over (its holder's liveness cannot be checked from here): the error says
which file to remove once that run is known to be gone. Without `fcntl` (Windows) the file is created exclusively
and a holder on this host that no longer runs is stale.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunDirectoryLocked(RuntimeError):
    """The run directory is locked by another live run; the message names the holder (pid, host, start time)."""


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {when}: {holder.get('command', '?')})"


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive, process-lifetime lock on `run_dir` (the file `run_dir/run.lock`).

    Args:
        run_dir (`str` or `os.PathLike`): the run directory (created if needed).

    Example:

    ```py
    >>> with RunLock("outputs/demo"):
    ...     ...  # nothing else can lock outputs/demo until this block ends (or this process dies)
    ```
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: Optional[int] = None

    def holder(self) -> Optional[dict[str, Any]]:
        """The holder recorded in the lock file, or `None` (no file, or nothing readable in it)."""
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def acquire(self) -> RunLock:
        """Take the lock, or raise [`RunDirectoryLocked`] naming its holder."""
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)}
        for _ in range(20):  # retried only when the file is replaced under us
            fd = self._open_locked(me)
            if fd is None:
                continue
            self._fd = fd
            return self
        raise RunDirectoryLocked(f"Could not lock {self.path}: it kept being replaced by another process.")

    def _open_locked(self, me: dict[str, Any]) -> Optional[int]:
        if fcntl is None:  # pragma: no cover - Windows
            return self._open_exclusive(me)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder() or {}
            raise RunDirectoryLocked(
                f"{self.run_dir} is in use by another run: {_describe(holder)} holds {self.path}. Wait for it to "
                "finish (a second --resume of a live run is refused too), or use another output_dir."
            ) from None
        try:
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                os.close(fd)  # the file we locked was removed and replaced meanwhile: lock the new one
                return None
        except FileNotFoundError:
            os.close(fd)
            return None
        previous = self._read_fd(fd)
        if previous:
            if previous.get("host") not in (None, me["host"]):
                os.close(fd)
                raise RunDirectoryLocked(
                    f"{self.path} records a run of another host: {_describe(previous)}. Its liveness cannot be checked "
                    f"from {me['host']}; if that run is gone, delete {self.path} and retry."
                )
            logger.warning("Taking over the stale lock %s of %s, which no longer runs.", self.path, _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        return fd

    @staticmethod
    def _read_fd(fd: int) -> Optional[dict[str, Any]]:
        size = os.fstat(fd).st_size
        if not size:
            return None
        try:
            holder = json.loads(os.pread(fd, size, 0))
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _open_exclusive(self, me: dict[str, Any]) -> Optional[int]:  # pragma: no cover - Windows
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = self.holder() or {}
            if holder.get("host") == me["host"] and not _pid_alive(holder.get("pid")):
                logger.warning("Removing the stale lock %s of %s, which no longer runs.", self.path, _describe(holder))
                self.path.unlink(missing_ok=True)
                return None
            raise RunDirectoryLocked(f"{self.run_dir} is in use by another run: {_describe(holder)} holds {self.path}.") from None
        os.write(fd, json.dumps(me).encode())
        return fd

    def release(self) -> None:
        """Release the lock (removing its file). Idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting process then re-creates the file
        finally:
            os.close(fd)  # releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_run_lock(state, run_dir: str | os.PathLike) -> Optional[RunLock]:
    """Lock `run_dir` on the main process of `state` (an `accelerate.PartialState`); every process learns whether it
    could, so that all of them fail together (none waits at a barrier for a main process that gave up).

    Returns:
        The held [`RunLock`] on the main process, `None` elsewhere.

    Raises:
        [`RunDirectoryLocked`]: on every process, when the main process could not take the lock.
    """
    lock, error = (RunLock(run_dir), None) if state.is_main_process else (None, None)
    if lock is not None:
        try:
            lock.acquire()
        except RunDirectoryLocked as err:
            error = err
    if state.num_processes > 1:
        import torch
        from accelerate.utils import broadcast

        flag = broadcast(torch.tensor([0 if error is None else 1], device=state.device), from_process=0)
        if int(flag.item()) and error is None:
            raise RunDirectoryLocked(f"{run_dir} is locked by another run (the main process's error names it).")
    if error is not None:
        raise error
    return lock
