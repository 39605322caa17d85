"""The 2-D layout of ranks and the split of slides and tiles over it (pure Python, no torch.distributed).

``world_size`` ranks form ``slide_groups = world_size / tile_parallel`` groups of ``tile_parallel`` consecutive
ranks. All ranks of a group share the same slides in a step, each holding a contiguous share of every slide's
tiles; different groups take different slides. Shares are made of whole chunks of a global chunk layout
(``chunk_tiles`` tiles per chunk, the last one shorter) so that chunk ``c`` of a slide is encoded by the same
tiles under the same seed on any number of ranks - which is what makes dropout exact across layouts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """World size and tile-parallel degree, validated on construction."""

    world_size: int
    tile_parallel: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.tile_parallel < 1:
            raise ValueError(f"tile_parallel must be >= 1, got {self.tile_parallel}")
        if self.world_size % self.tile_parallel:
            raise ValueError(
                f"world_size {self.world_size} is not divisible by tile_parallel {self.tile_parallel}: "
                f"tile-parallel groups must tile the world (choose tile_parallel among "
                f"{[d for d in range(1, self.world_size + 1) if self.world_size % d == 0]})"
            )

    @property
    def slide_groups(self) -> int:
        """Number of groups that take different slides in the same step."""
        return self.world_size // self.tile_parallel

    def group_of(self, rank: int) -> int:
        """The slide group of ``rank``."""
        return rank // self.tile_parallel

    def tp_rank(self, rank: int) -> int:
        """Position of ``rank`` inside its tile-parallel group."""
        return rank % self.tile_parallel

    def group_ranks(self, group: int) -> list[int]:
        """The ranks of slide group ``group`` (consecutive, so a group stays inside a node when it fits)."""
        return list(range(group * self.tile_parallel, (group + 1) * self.tile_parallel))


def chunk_bounds(k_total: int, chunk_tiles: int) -> list[tuple[int, int]]:
    """The global chunk layout of a slide with ``k_total`` tiles: ``[(start, stop), ...]``."""
    if chunk_tiles < 1:
        raise ValueError(f"chunk_tiles must be >= 1, got {chunk_tiles}")
    return [(s, min(s + chunk_tiles, k_total)) for s in range(0, k_total, chunk_tiles)]


def rank_chunk_range(n_chunks: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Chunks ``[c0, c1)`` held by ``tp_rank`` of ``tp_size``: as even as whole chunks allow, in rank order."""
    base, extra = divmod(n_chunks, tp_size)
    c0 = tp_rank * base + min(tp_rank, extra)
    return c0, c0 + base + (1 if tp_rank < extra else 0)


def rank_tile_range(k_total: int, chunk_tiles: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Tiles ``[start, stop)`` of a ``k_total``-tile slide that ``tp_rank`` reads, holds and encodes."""
    n_chunks = -(-k_total // chunk_tiles)
    c0, c1 = rank_chunk_range(n_chunks, tp_rank, tp_size)
    return min(c0 * chunk_tiles, k_total), min(c1 * chunk_tiles, k_total)


def slides_for_group(n_slides: int, n_groups: int, group: int) -> list[int]:
    """Indices of the step's slides that slide group ``group`` processes (round robin)."""
    return list(range(group, n_slides, n_groups))
