"""Deterministic randomness for chunked, sharded and recomputed forward passes.

Dropout and drop-path draw from the global RNG. For the gradient to be the same in every memory mode and on
every number of processes, each forward call must draw the same values wherever and whenever it runs. So
every encoder chunk and every aggregator call runs under its own seed, derived from the step seed, the
slide's index in the step and the chunk's index in the slide's global chunk layout. Pass 2 of ``recompute``
replays a chunk by re-entering the same seed; the caller's RNG stream is left untouched (forked).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch

AGGREGATOR_CHUNK = -1  # chunk index used for the aggregator call of a slide


def derive_seed(step_seed: int, slide_index: int, chunk_index: int) -> int:
    """A 63-bit seed that is a fixed function of (step, slide, chunk), stable across processes and runs."""
    digest = hashlib.blake2b(f"{step_seed}/{slide_index}/{chunk_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the CPU (and, on CUDA, the current device's) RNG seeded; restore both after."""
    devices = [device] if device.type == "cuda" else []  # the CPU RNG is always forked
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


def aggregator_tile_chunk(chunk_index: int) -> int:
    """Chunk index (in seed space) of an attention-pooling aggregator's tile stage on encoder chunk ``chunk_index``."""
    return -2 - chunk_index
