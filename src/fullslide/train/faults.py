"""How a training run meets the world outside it: stop signals (Ctrl-C, Slurm's SIGTERM) acted on at step
boundaries, a torchrun peer that died, a disk that filled up. The training loop calls these; it does not contain
them."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from fullslide.engine import ParallelContext
from fullslide.errors import FullslideError

log = logging.getLogger("fullslide.train")


class StopRequested(KeyboardInterrupt):
    """Ctrl-C or SIGTERM acted on at a step or epoch boundary, where the saved state matches the steps taken.

    ``signum`` is the signal that asked (the command exits with 128 + signum: 130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__()
        self.signum = int(signum)


class StopFlag(threading.Event):
    """Set by the first SIGINT / SIGTERM; remembers which signal it was."""

    signum: int = signal.SIGINT


@contextlib.contextmanager
def deferred_interrupt(flag: StopFlag):
    """The first SIGINT (Ctrl-C) or SIGTERM (Slurm before preemption or the time limit) only sets ``flag``:
    training stops before its next step, or after the current validation, in a consistent state, and saves it.
    A second Ctrl-C interrupts at once, without saving. A repeated SIGTERM does not: a signal to the process
    group reaches each rank directly *and* through torchrun, which forwards it (Slurm sends SIGKILL itself
    when its grace period ends)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        flag.signum = signum
        flag.set()
        log.warning("%s: stopping at the next step boundary and saving a checkpoint (send it again to abort)",
                    signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Outside a training loop (an experiment's or cv's evaluation, reports): SIGTERM raises
    :class:`StopRequested` at once, so the command exits 143 like a stopped training run instead of dying with the
    default action; what it writes is atomic, so nothing is left half-written, and a rerun redoes the unfinished
    part. Inside ``train``, :func:`deferred_interrupt` takes over (and gives this handler back when it returns)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise StopRequested(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def peers_of(ctx: ParallelContext) -> list[tuple[str, int]]:
    """(host, pid) of every rank (one all_gather_object at start-up; just this process without torchrun)."""
    me = (socket.gethostname(), os.getpid())
    if not ctx.distributed:
        return [me]
    import torch.distributed as dist

    peers: list[Any] = [None] * ctx.dims.world_size
    dist.all_gather_object(peers, me)  # COLLECTIVE (world): once per run, not in the hot loop
    return [tuple(p) for p in peers]


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because a peer went away (gloo or NCCL)."""
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        w in text for w in ("gloo", "nccl", "connection closed", "connection reset", "peer", "broken pipe"))


def lost_ranks(peers: list[tuple[str, int]], me: int, wait_s: float = 2.0) -> str:
    """Name the ranks whose process is gone ("rank 1 (pid 123 on node3)"); ranks on other nodes cannot be
    probed from here, so an undetermined loss is named as such."""
    host = socket.gethostname()
    deadline = time.monotonic() + wait_s
    while True:
        lost = [r for r, (h, pid) in enumerate(peers) if r != me and h == host and not _alive(pid)]
        if lost or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if lost:
        return ", ".join(f"rank {r} (pid {peers[r][1]} on {peers[r][0]})" for r in lost)
    remote = sorted({h for h, _ in peers if h != host})
    return "contact with another rank" + (f" (on {', '.join(remote)}; its own log says why)" if remote else "")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by torchrun, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not os.path.isdir("/proc")  # /proc exists but has no entry: gone


@contextlib.contextmanager
def disk_errors(run_dir: Path):
    """A full or unwritable disk during a run: one line naming the file, never a traceback. Every checkpoint is
    written to a temporary folder and renamed, so the last complete one is still there to resume from."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        where = exc.filename or run_dir
        raise FullslideError(f"{where}: {exc.strerror or exc}; the last complete checkpoint in {run_dir} is kept "
                             f"(free the disk, then --resume {run_dir})") from None
