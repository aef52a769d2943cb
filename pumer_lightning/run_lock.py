"""One fit at a time per run directory: `RunDirectoryLock`.

Standard library only (no torch, no Lightning), so that any process, a test's lock holder included, takes the
same lock cheaply. `pumer_lightning.callbacks.checkpoint.run_directories` says which directories a fit writes;
the command line (`pumer_lightning.cli`) locks them before the overwrite check and releases them when the fit ends.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: File that marks a run directory as being written by a fit (holds the fit's pid, host and start time).
LOCK_NAME = ".fit.lock"


class RunDirectoryLock:
    """Exclusive locks on the directories a fit writes (its run directory, explicit checkpoint directories), so
    that two fits started at once into one directory cannot both write it.

    Each lock is an ``fcntl.flock`` on ``<dir>/.fit.lock``, which also names the holder (pid, host, start time,
    command). The operating system drops the lock when its process dies, however it dies; a lock file left behind
    by a killed fit is taken over with a warning naming that fit. `release` (at the end of the fit) removes the
    files. On a filesystem without lock support the fit runs unlocked, with a warning.
    """

    def __init__(self, directories: list[Path]) -> None:
        self.directories = sorted({Path(d) for d in directories})
        self.held: list[tuple[Path, int]] = []
        self.made: list[Path] = []  # directories created only to hold a lock (removed again if left empty)

    def acquire(self) -> RunDirectoryLock:
        try:
            for directory in self.directories:
                self._take(directory)
        except BaseException:
            self.release()
            raise
        return self

    def _take(self, directory: Path) -> None:
        import fcntl

        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            self.made.append(directory)
        path = directory / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise SystemExit(
                    f"error: run directory {directory} is in use by another fit ({_describe(holder)}; lock file "
                    f"{path}); wait for it to end, or start this run in another directory"
                ) from None
            except OSError as err:
                os.close(fd)
                log.warning("cannot lock %s (%s): this fit runs without a run-directory lock", path, err)
                return
            try:
                same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:  # released (and removed) by its holder between our open and our lock
                same_file = False
            if same_file:
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous:
            log.warning(
                "taking over the stale lock of %s: that fit ended without releasing %s",
                _describe(previous),
                path,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_this_process()).encode(), 0)
        self.held.append((path, fd))

    def release(self) -> None:
        """Remove the lock files and drop the locks (idempotent)."""
        while self.held:
            path, fd = self.held.pop()
            try:
                path.unlink(missing_ok=True)  # while still locked, so nobody locks the old file meanwhile
            finally:
                os.close(fd)
        for directory in reversed(self.made):
            try:
                directory.rmdir()  # only when the fit wrote nothing there
            except OSError:
                pass
        self.made.clear()


def _this_process() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
