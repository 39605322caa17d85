"""Which slides and which tiles each step of an epoch uses: a pure, seeded function of (seed, epoch).

Every rank computes the same plan, so no communication is needed to agree on it, a resumed run replays it,
and each rank then reads only its own share of each slide (``rank_tile_range``). Slides are shuffled per
epoch; K tiles are drawn per slide without replacement (every tile plus random repeats when a slide has
fewer than K; ``"all"`` takes every tile), fresh each epoch; tile indices are sorted for read locality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np


@dataclass(frozen=True)
class StepPlan:
    """One optimisation step: slides (indices into the training list) and their tile indices."""

    epoch: int
    step: int
    slides: tuple[int, ...]
    tiles: tuple[np.ndarray, ...]  # per slide: sorted indices into its coords, length K


def draw_tiles(n_tiles: int, k: int | Literal["all"], rng: np.random.Generator) -> np.ndarray:
    """K tile indices out of ``n_tiles``: without replacement, or all plus repeats when there are fewer."""
    if n_tiles < 1:
        raise ValueError("a slide with no tiles cannot be sampled")
    if k == "all" or k == n_tiles:
        return np.arange(n_tiles)
    if n_tiles > k:
        picked = rng.choice(n_tiles, size=k, replace=False)
    else:
        picked = np.concatenate([np.arange(n_tiles), rng.choice(n_tiles, size=k - n_tiles, replace=True)])
    return np.sort(picked)


class TileSampler:
    """Seeded epoch plans over a training set of slides with known tile counts."""

    def __init__(
        self,
        n_tiles: Sequence[int],
        *,
        k: int | Literal["all"],
        slides_per_step: int,
        epoch_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not n_tiles:
            raise ValueError("no training slides")
        self.n_tiles = list(n_tiles)
        self.k = k
        self.slides_per_step = slides_per_step
        self.epoch_fraction = epoch_fraction
        self.seed = seed

    @property
    def slides_per_epoch(self) -> int:
        return max(1, round(self.epoch_fraction * len(self.n_tiles)))

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.slides_per_epoch // self.slides_per_step)

    def epoch(self, epoch: int) -> list[StepPlan]:
        """The steps of ``epoch`` (the last one may hold fewer slides)."""
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.n_tiles))[: self.slides_per_epoch]
        plans = []
        for step, start in enumerate(range(0, len(order), self.slides_per_step)):
            slides = tuple(int(i) for i in order[start : start + self.slides_per_step])
            tiles = tuple(
                draw_tiles(self.n_tiles[i], self.k, np.random.default_rng([self.seed, epoch, 1, i])) for i in slides
            )
            plans.append(StepPlan(epoch=epoch, step=step, slides=slides, tiles=tiles))
        return plans


def step_seed(seed: int, epoch: int, step: int) -> int:
    """The engine's dropout seed for one step (a fixed function of the run seed and the position)."""
    return int(np.random.SeedSequence([seed, epoch, step, 2]).generate_state(1)[0])
