"""Tile augmentations for training: flips, 90-degree rotations, light blur, colour jitter.

Each tile draws from its own generator keyed by (seed, epoch, slide, position of the tile in the slide's K
list), so a tile is augmented the same way whichever rank reads it and whatever the tile-parallel layout:
augmentation never breaks the equality of gradients across layouts, and a resumed run replays it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Augment:
    """Augmentation settings (see ``AugmentConfig``)."""

    flip: bool = True
    rot90: bool = True
    blur_p: float = 0.2
    jitter: float = 0.05

    @property
    def active(self) -> bool:
        return self.flip or self.rot90 or self.blur_p > 0 or self.jitter > 0


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _blur(tile: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float32 [H, W, 3] tile (reflect padding)."""
    radius = max(1, int(round(2 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(tile, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    rows = sum(w * padded[i : i + tile.shape[0]] for i, w in enumerate(kernel))
    return sum(w * rows[:, i : i + tile.shape[1]] for i, w in enumerate(kernel))


def augment_tile(tile: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """One uint8 [H, W, 3] tile -> augmented uint8 [H, W, 3] (a new array)."""
    out = tile
    if aug.flip and rng.random() < 0.5:
        out = out[:, ::-1]
    if aug.flip and rng.random() < 0.5:
        out = out[::-1]
    if aug.rot90:
        out = np.rot90(out, int(rng.integers(4)))
    blur = aug.blur_p > 0 and rng.random() < aug.blur_p
    sigma = float(rng.uniform(0.3, 1.0))
    if aug.jitter > 0:
        b, c, s = rng.uniform(1 - aug.jitter, 1 + aug.jitter, size=3).astype(np.float32)
    if not blur and aug.jitter <= 0:
        return np.ascontiguousarray(out)
    x = out.astype(np.float32)
    if blur:
        x = _blur(x, sigma)
    if aug.jitter > 0:
        x = x * b  # brightness
        x = (x - x.mean()) * c + x.mean()  # contrast
        gray = (x @ _LUMA)[..., None]
        x = gray + (x - gray) * s  # saturation
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def augment_tiles(
    tiles: np.ndarray, aug: Augment, *, seed: int, epoch: int, slide: int, positions: np.ndarray
) -> np.ndarray:
    """Augment uint8 [k, H, W, 3] tiles; ``positions`` are the tiles' places in the slide's K list."""
    if not aug.active:
        return tiles
    out = np.empty_like(tiles)
    for i, pos in enumerate(positions.tolist()):
        out[i] = augment_tile(tiles[i], aug, np.random.default_rng([seed, epoch, slide, pos, 3]))
    return out
