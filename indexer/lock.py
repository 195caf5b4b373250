"""The write lock that keeps two `clipsearch index` runs off the same table.

An advisory `fcntl.flock` on `<table>.lock` beside the table: the kernel drops it when the holder exits,
even by `kill -9`, so a crashed run never leaves a stale lock behind. The holder's pid is written into the
file for the error message and `clipsearch status`.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

from retrieval.errors import StoreLockedError, StoreWriteError

_RETRY_SECONDS = 0.2


class IndexLock:
    """An exclusive, non-reentrant lock on a lock file.

    Args:
        path: the lock file (created if missing).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, wait: float = 10.0) -> None:
        """Take the lock, retrying for up to `wait` seconds.

        Raises:
            StoreLockedError: another process still holds it after `wait` seconds.
            StoreWriteError: the lock file cannot be opened for writing (a read-only store).
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreWriteError.from_error(self.path.parent, e) from e
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    holder = self.holder()
                    who = f" (pid {holder})" if holder else ""
                    raise StoreLockedError(
                        f"another `clipsearch index`{who} is writing to {self.path.parent}; wait for it to finish "
                        "and run this again (or pass --lock-wait SECONDS to wait longer)"
                    ) from None
                time.sleep(_RETRY_SECONDS)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise StoreWriteError.from_error(self.path.parent, e) from e
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (closing the file drops it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def holder(self) -> int | None:
        """The pid of the process holding the lock now, or None when it is free."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def __enter__(self) -> IndexLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
