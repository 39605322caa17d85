"""Memory meters: bytes autograd holds for backward, peak process RSS, peak CUDA allocation.

``SavedTensorMeter`` counts, through autograd's saved-tensor hooks, the bytes of activations kept alive for
backward (parameters excluded, shared storages counted once). It is exact and deterministic on any device,
which makes it the right probe for "does recompute keep more than one chunk's graph alive".
``PeakRSS`` samples the process's resident memory in a background thread (CPU runs);
on CUDA use ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from types import TracebackType

import torch


class _Held:
    """Wrapper returned by the pack hook; its finalizer releases the count when autograd frees it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedTensorMeter:
    """Context manager: ``peak_bytes`` of autograd-saved activations while active."""

    def __init__(self) -> None:
        self.current_bytes = 0
        self.peak_bytes = 0
        self._refs: dict[int, int] = {}
        self._active: list[torch.autograd.graph.saved_tensors_hooks] = []

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current_bytes -= nbytes

    def _pack(self, tensor: torch.Tensor) -> object:
        base = tensor._base if tensor._base is not None else tensor
        if base.is_leaf and base.requires_grad:  # a parameter or a view of one (weight.t()): not an activation
            return tensor
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key not in self._refs:
            self._refs[key] = 0
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self._refs[key] += 1
        held = _Held(tensor)
        weakref.finalize(held, self._release, key, nbytes)
        return held

    @staticmethod
    def _unpack(obj: object) -> torch.Tensor:
        return obj.tensor if isinstance(obj, _Held) else obj  # type: ignore[return-value]

    def __enter__(self) -> "SavedTensorMeter":
        """Count what is saved inside the block; re-entrant, so a module can wrap each of its forwards."""
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        hooks.__enter__()
        self._active.append(hooks)
        return self

    def __exit__(self, *exc: object) -> None:
        self._active.pop().__exit__(*exc)


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakRSS:
    """Context manager sampling RSS every ``interval_s``; ``peak_growth_bytes`` is peak minus start."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.start_bytes = self.peak_bytes = current_rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    @property
    def peak_growth_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes
