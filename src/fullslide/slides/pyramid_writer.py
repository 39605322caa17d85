"""Streaming writer of pyramidal, JPEG-tiled TIFFs that OpenSlide and tiffslide both read.

Layout (OpenSlide's "generic tiled TIFF"): one main directory per level, level 0 first, each
tiled and JPEG-compressed, levels halving in size (ceil), reduced levels flagged with
NewSubfileType=1 (which is also how tifffile, hence tiffslide, groups them into one pyramid), and
X/YResolution in pixels per centimetre so both libraries report the mpp. No vendor description
is faked.

Memory stays bounded whatever the size: level 0 is consumed strip by strip (one tile row) and
written as it comes; each strip is also halved into the next level, whose finished tile rows are
JPEG-encoded into a spool file beside the output and copied in, still encoded, once level 0 is
done. At any time only a few tile rows per level are held.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fullslide.slides.base import box_reduce

TILE_PX = 256
JPEG_QUALITY = 85
_WHITE = 255


def pyramid_dimensions(width: int, height: int, *, min_levels: int = 3, smallest_px: int = 512) -> list[tuple[int, int]]:
    """Level sizes, halving (ceil) until the longest side is <= ``smallest_px`` and there are
    at least ``min_levels`` levels."""
    dims = [(int(width), int(height))]
    while len(dims) < min_levels or max(dims[-1]) > smallest_px:
        w, h = dims[-1]
        if w == 1 and h == 1:
            break
        dims.append((math.ceil(w / 2), math.ceil(h / 2)))
    return dims


def encode_tile(tile: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """One JPEG tile (YCbCr 4:2:0, as Aperio and most scanners store them)."""
    import imagecodecs

    return bytes(imagecodecs.jpeg_encode(tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)))


def _tiles_of_rows(rows: np.ndarray, tile_px: int) -> Iterator[np.ndarray]:
    """Cut up to ``tile_px`` rows into tiles, left to right, padded with white to full tiles."""
    width = rows.shape[1]
    for x in range(0, width, tile_px):
        tile = rows[:, x : x + tile_px]
        if tile.shape[0] != tile_px or tile.shape[1] != tile_px:
            full = np.full((tile_px, tile_px, 3), _WHITE, dtype=np.uint8)
            full[: tile.shape[0], : tile.shape[1]] = tile
            tile = full
        yield np.ascontiguousarray(tile)


class _LevelSpool:
    """One reduced level: halves the rows of the level above and spools its encoded tiles."""

    def __init__(self, dims: tuple[int, int], tile_px: int, quality: int, spool: BinaryIO, below: _LevelSpool | None) -> None:
        self.width, self.height = dims
        self.tile_px, self.quality = tile_px, quality
        self.spool = spool
        self.sizes: list[int] = []
        self.below = below
        self._odd_row: np.ndarray | None = None
        self._rows_done = 0
        self._carry = np.empty((0, self.width, 3), dtype=np.uint8)

    def push(self, rows: np.ndarray) -> None:
        """Take rows of the level above (full width): halve them now, emit whole tile rows."""
        if self._odd_row is not None:  # an odd row waits for its partner
            rows = np.concatenate([self._odd_row, rows], axis=0)
            self._odd_row = None
        if rows.shape[0] % 2:
            self._odd_row = rows[-1:].copy()
            rows = rows[:-1]
        if rows.shape[0]:
            self._take(box_reduce(rows, 2)[:, : self.width])

    def finish(self) -> None:
        """Flush what is left (the bottom edge), then the levels below."""
        if self._odd_row is not None:
            self._take(box_reduce(self._odd_row, 2)[:, : self.width])  # edge row pairs with itself
            self._odd_row = None
        if self._carry.shape[0]:
            self._emit(self._carry)
            self._carry = self._carry[:0]
        if self.below is not None:
            self.below.finish()

    def _take(self, half: np.ndarray) -> None:
        """Rows of this level: pass them down, and encode each completed tile row."""
        half = half[: self.height - self._rows_done]
        self._rows_done += half.shape[0]
        if self.below is not None and half.shape[0]:
            self.below.push(half)
        buffered = np.concatenate([self._carry, half], axis=0) if self._carry.shape[0] else half
        while buffered.shape[0] >= self.tile_px:
            self._emit(buffered[: self.tile_px])
            buffered = buffered[self.tile_px :]
        self._carry = buffered.copy() if buffered.base is not None else buffered

    def _emit(self, rows: np.ndarray) -> None:
        for tile in _tiles_of_rows(rows, self.tile_px):
            data = encode_tile(tile, self.quality)
            self.spool.write(data)
            self.sizes.append(len(data))

    def tiles(self) -> Iterator[bytes]:
        """The spooled tiles, in order."""
        self.spool.flush()
        self.spool.seek(0)
        for size in self.sizes:
            yield self.spool.read(size)


def write_pyramidal_tiff(
    path: str | Path,
    size_wh: tuple[int, int],
    strips: Iterable[np.ndarray],
    *,
    mpp: float,
    tile_px: int = TILE_PX,
    quality: int = JPEG_QUALITY,
    min_levels: int = 3,
    description: str | None = None,
) -> list[tuple[int, int]]:
    """Write a pyramidal TIFF from level-0 ``strips`` (uint8 [tile_px, width, 3], the last one
    possibly shorter) and return the level sizes. Writes ``path`` directly: wrap it in
    ``atomic_path`` for atomicity."""
    import tifffile

    width, height = int(size_wh[0]), int(size_wh[1])
    dims = pyramid_dimensions(width, height, min_levels=min_levels)
    # BigTIFF once a file could pass 4 GB (JPEG rarely compresses H&E less than 4:1)
    bigtiff = width * height * 3 > 4 * 2**32 // 3
    path = Path(path)
    chain: _LevelSpool | None = None  # level 1, which feeds level 2, ...

    def level0_tiles() -> Iterator[bytes]:
        done = 0
        for strip in strips:
            strip = np.asarray(strip)
            expected = min(tile_px, height - done)
            if strip.shape != (expected, width, 3) or strip.dtype != np.uint8:
                raise ValueError(f"strip at row {done}: expected uint8 {(expected, width, 3)}, got {strip.dtype} {strip.shape}")
            done += expected
            if chain is not None:
                chain.push(strip)
                if done == height:
                    chain.finish()  # before the last tiles go out: tifffile may stop pulling after them
            for tile in _tiles_of_rows(strip, tile_px):
                yield encode_tile(tile, quality)
        if done != height:
            raise ValueError(f"strips covered {done} rows, expected {height}")

    common: dict[str, Any] = {
        "dtype": np.uint8, "tile": (tile_px, tile_px), "compression": "jpeg", "photometric": "rgb",
        "resolutionunit": "CENTIMETER", "metadata": None, "software": "fullslide",
    }
    with contextlib.ExitStack() as stack:
        spool_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.spool-")))
        levels: list[_LevelSpool] = []
        for k in range(len(dims) - 1, 0, -1):
            spool = stack.enter_context(open(spool_dir / f"level{k}.jpg", "w+b"))
            chain = _LevelSpool(dims[k], tile_px, quality, spool, chain)
            levels.insert(0, chain)
        tiff = stack.enter_context(tifffile.TiffWriter(path, bigtiff=bigtiff))
        tiff.write(level0_tiles(), shape=(height, width, 3), resolution=(1e4 / mpp, 1e4 / mpp),
                   description=description, **common)
        for k, level in enumerate(levels, start=1):
            level_mpp = mpp * width / dims[k][0]
            tiff.write(level.tiles(), shape=(dims[k][1], dims[k][0], 3), subfiletype=1,
                       resolution=(1e4 / level_mpp, 1e4 / level_mpp), **common)
    return dims
