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
    """Run the block with the CPU (and, on CUDA, the device's) generator seeded; restore both after.

    Seeds the default generators directly: ``torch.manual_seed`` also queues a lazy CUDA seeding that records
    a stack trace on every call, which costs more than a small chunk's forward pass on a CPU.
    """
    cpu_state = torch.get_rng_state()
    cuda_gen = None
    if device.type == "cuda":
        cuda_gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        cuda_state = cuda_gen.get_state()
        cuda_gen.manual_seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_gen is not None:
            cuda_gen.set_state(cuda_state)


def aggregator_tile_chunk(chunk_index: int) -> int:
    """Chunk index (in seed space) of an attention-pooling aggregator's tile stage on encoder chunk ``chunk_index``."""
    return -2 - chunk_index
