"""One writer per run folder: an advisory ``flock`` on ``RUN/.lock`` held for the life of the run.

The kernel drops the lock when its process dies (``kill -9``, a node crash), so a stale lock never blocks a
resume; a second live run on the same folder is refused with the holder's pid and host.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from fullslide.errors import FullslideError

LOCK_FILE = ".lock"


class RunLock:
    """Take the lock of ``run_dir`` on construction (FullslideError if another process holds it)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._read_holder()
            os.close(self._fd)
            self._fd = None
            raise FullslideError(f"{Path(run_dir)}: another fullslide run ({holder}) is writing to this folder; "
                                 "wait for it to finish or choose another run_dir") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())

    def _read_holder(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip() or "pid unknown"
        except OSError:
            return "pid unknown"

    def release(self) -> None:
        """Drop the lock (also done by the kernel when the process exits)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
