"""Tile geometry in pure numpy: level choice, tile sizes at each level, grids and box coverage.

Everything here is arithmetic on numbers and arrays (no slide library, no file), so it is
parametrised in tests. Coordinates are level-0 pixels (x, y); units go in the names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

#: Relative mpp difference under which a pyramid level counts as the target (0.499 reads as 0.5).
DEFAULT_MATCH_TOLERANCE = 0.05


@dataclasses.dataclass(frozen=True)
class TileGeometry:
    """How one tile at ``target_mpp`` x ``tile_px`` is read from one slide.

    ``read_px`` is the square read at pyramid ``level``; it is resized (antialiased) to ``tile_px``
    when the level does not match the target. ``level0_px`` is the tile's side in level-0 pixels,
    which is also the grid stride.
    """

    target_mpp: float
    tile_px: int
    slide_mpp: float
    level: int
    level_downsample: float
    read_px: int
    level0_px: int
    match_tolerance: float = DEFAULT_MATCH_TOLERANCE

    def __post_init__(self) -> None:
        for name in ("target_mpp", "slide_mpp", "level_downsample", "match_tolerance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0) or (name != "match_tolerance" and value == 0):
                raise ValueError(f"TileGeometry.{name} must be a positive finite number, got {value!r}")
        for name in ("tile_px", "read_px", "level0_px"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TileGeometry.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.level < 0:
            raise ValueError(f"TileGeometry.level must be >= 0, got {self.level}")

    @property
    def level_mpp(self) -> float:
        """Micrometres per pixel of the pyramid level that is read."""
        return self.slide_mpp * self.level_downsample

    @property
    def needs_resize(self) -> bool:
        """True when the read square is resampled to ``tile_px``."""
        return self.read_px != self.tile_px

    @property
    def tile_mpp(self) -> float:
        """Effective mpp of the output tiles (the level's own mpp when it matched the target)."""
        return self.level0_px * self.slide_mpp / self.tile_px

    def to_attrs(self) -> dict[str, Any]:
        """HDF5 attributes: CLAM/TRIDENT names where they exist, ours beside them."""
        return {
            "patch_size": int(self.tile_px),
            "patch_size_level0": int(self.level0_px),
            "patch_level": int(self.level),
            "downsample": np.array([self.level_downsample, self.level_downsample], dtype=np.float64),
            "overlap": 0,
            "target_mpp": float(self.target_mpp),
            "slide_mpp": float(self.slide_mpp),
            "read_px": int(self.read_px),
            "match_tolerance": float(self.match_tolerance),
            "target_magnification": round(10.0 / self.target_mpp, 3),
            "level0_magnification": round(10.0 / self.slide_mpp, 3),
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> TileGeometry:
        """Inverse of :meth:`to_attrs`; raises KeyError or ValueError on a missing or bad value."""
        downsample = np.asarray(attrs["downsample"], dtype=np.float64).reshape(-1)
        return cls(
            target_mpp=float(attrs["target_mpp"]),
            tile_px=int(attrs["patch_size"]),
            slide_mpp=float(attrs["slide_mpp"]),
            level=int(attrs["patch_level"]),
            level_downsample=float(downsample[0]),
            read_px=int(attrs["read_px"]),
            level0_px=int(attrs["patch_size_level0"]),
            match_tolerance=float(attrs.get("match_tolerance", DEFAULT_MATCH_TOLERANCE)),
        )


def choose_level(
    slide_mpp: float,
    level_downsamples: tuple[float, ...] | list[float] | np.ndarray,
    target_mpp: float,
    match_tolerance: float = DEFAULT_MATCH_TOLERANCE,
) -> tuple[int, bool]:
    """The coarsest level at or finer than ``target_mpp`` (within tolerance), and whether it matches.

    A level matches when its mpp is within ``match_tolerance`` (relative) of the target; it is
    then read without resampling. When every level is coarser than the target, level 0 is
    returned (the tile is upsampled).
    """
    level_mpp = slide_mpp * np.asarray(level_downsamples, dtype=np.float64)
    if level_mpp.ndim != 1 or level_mpp.size == 0:
        raise ValueError("level_downsamples must be a non-empty sequence")
    usable = np.flatnonzero(level_mpp <= target_mpp * (1.0 + match_tolerance))
    if usable.size == 0:
        level = 0
    else:
        # coarsest usable level; ties keep the lowest index
        level = int(usable[np.argmax(level_mpp[usable])])
    matched = abs(level_mpp[level] / target_mpp - 1.0) <= match_tolerance
    return level, bool(matched)


def plan_tile_geometry(
    slide_mpp: float,
    level_downsamples: tuple[float, ...] | list[float] | np.ndarray,
    target_mpp: float = 0.5,
    tile_px: int = 224,
    match_tolerance: float = DEFAULT_MATCH_TOLERANCE,
) -> TileGeometry:
    """Plan how ``tile_px`` tiles at ``target_mpp`` are read from a slide of ``slide_mpp``."""
    if not (slide_mpp > 0 and math.isfinite(slide_mpp)):
        raise ValueError(f"slide_mpp must be a positive number, got {slide_mpp!r}")
    if not (target_mpp > 0 and math.isfinite(target_mpp)):
        raise ValueError(f"target_mpp must be a positive number, got {target_mpp!r}")
    if int(tile_px) < 1:
        raise ValueError(f"tile_px must be >= 1, got {tile_px!r}")
    if not 0 <= match_tolerance < 1:
        raise ValueError(f"match_tolerance must be in [0, 1), got {match_tolerance!r}")
    level, matched = choose_level(slide_mpp, level_downsamples, target_mpp, match_tolerance)
    downsample = float(np.asarray(level_downsamples, dtype=np.float64)[level])
    level_mpp = slide_mpp * downsample
    read_px = int(tile_px) if matched else max(1, round(tile_px * target_mpp / level_mpp))
    return TileGeometry(
        target_mpp=float(target_mpp),
        tile_px=int(tile_px),
        slide_mpp=float(slide_mpp),
        level=level,
        level_downsample=downsample,
        read_px=read_px,
        level0_px=max(1, round(read_px * downsample)),
        match_tolerance=float(match_tolerance),
    )


def grid_level0_xy(level0_wh: tuple[int, int], level0_px: int, stride_px: int | None = None) -> np.ndarray:
    """Origins of a regular grid covering the slide, int64 [N, 2] (x, y), row-major.

    The last row and column may run past the slide edge (read as white), so that tissue at the
    border is not lost; the tissue-fraction filter decides whether such tiles are kept.
    """
    width, height = (int(v) for v in level0_wh)
    stride = int(stride_px or level0_px)
    if width < 1 or height < 1 or level0_px < 1 or stride < 1:
        raise ValueError(f"bad grid: size {width}x{height}, tile {level0_px}, stride {stride}")
    xs = np.arange(0, width, stride, dtype=np.int64)
    ys = np.arange(0, height, stride, dtype=np.int64)
    grid = np.empty((ys.size, xs.size, 2), dtype=np.int64)
    grid[..., 0] = xs[None, :]
    grid[..., 1] = ys[:, None]
    return grid.reshape(-1, 2)


def box_coverage(
    mask: np.ndarray,
    level0_xy: np.ndarray,
    level0_px: float,
    mask_downsample: float | tuple[float, float],
) -> np.ndarray:
    """Mean of ``mask`` over each level-0 box [x, x+px) x [y, y+px), float64 [N] in [0, 1].

    ``mask_downsample`` is level-0 pixels per mask pixel (one value, or (x, y)). Mask pixels are
    treated as constant squares, so fractional box edges are handled exactly via a bilinear
    lookup in the summed-area table; area outside the mask counts as 0.
    """
    values = np.asarray(mask, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {values.shape}")
    xy = np.asarray(level0_xy, dtype=np.float64).reshape(-1, 2)
    if isinstance(mask_downsample, (int, float, np.number)):
        sx = sy = float(mask_downsample)
    else:
        sx, sy = (float(v) for v in mask_downsample)
    sat = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(values, axis=0), axis=1, out=sat[1:, 1:])
    x0, x1 = xy[:, 0] / sx, (xy[:, 0] + level0_px) / sx
    y0, y1 = xy[:, 1] / sy, (xy[:, 1] + level0_px) / sy
    total = _sat_at(sat, x1, y1) - _sat_at(sat, x0, y1) - _sat_at(sat, x1, y0) + _sat_at(sat, x0, y0)
    area = (x1 - x0) * (y1 - y0)
    return np.clip(total / area, 0.0, 1.0)


def _sat_at(sat: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Integral of the mask over [0, x) x [0, y) at fractional (x, y): bilinear in the table."""
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    x = np.clip(x, 0.0, w)
    y = np.clip(y, 0.0, h)
    ix = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
    iy = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
    fx, fy = x - ix, y - iy
    top = sat[iy, ix] * (1 - fx) + sat[iy, ix + 1] * fx
    bottom = sat[iy + 1, ix] * (1 - fx) + sat[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def level_region(
    level0_xy: tuple[int, int], level_downsample: float
) -> tuple[int, int]:
    """Top-left corner at a pyramid level of a level-0 point (floored, as the backends do)."""
    return (
        int(math.floor(level0_xy[0] / level_downsample + 1e-9)),
        int(math.floor(level0_xy[1] / level_downsample + 1e-9)),
    )


def level_to_level0(level_xy: tuple[int, int], level_downsample: float) -> tuple[int, int]:
    """The smallest level-0 point whose floored level position is ``level_xy`` (downsample >= 1)."""
    return (
        int(math.ceil(level_xy[0] * level_downsample - 1e-9)),
        int(math.ceil(level_xy[1] * level_downsample - 1e-9)),
    )
