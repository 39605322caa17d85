"""The exact end-to-end engine: whole-slide gradients in bounded memory, sharded over processes.

Public API (see ``step.py``): :func:`step`, :func:`infer`, :func:`encode_tiles`, :class:`Bag`,
:class:`StepResult`, :func:`init_parallel`, :class:`ParallelContext`, :class:`ParallelDims`,
:func:`rank_tile_range`, :func:`slides_for_group`. The engine knows nothing of slide files.
"""

from fullslide.engine.collectives import ParallelContext, init_parallel, shutdown_parallel
from fullslide.engine.mesh import ParallelDims, chunk_bounds, rank_tile_range, slides_for_group
from fullslide.engine.recompute import MODES, Mode
from fullslide.engine.step import Bag, InferResult, NonFiniteLossError, StepResult, encode_tiles, infer, step

__all__ = [
    "MODES",
    "Bag",
    "InferResult",
    "Mode",
    "NonFiniteLossError",
    "ParallelContext",
    "ParallelDims",
    "StepResult",
    "chunk_bounds",
    "encode_tiles",
    "infer",
    "init_parallel",
    "shutdown_parallel",
    "rank_tile_range",
    "slides_for_group",
    "step",
]
