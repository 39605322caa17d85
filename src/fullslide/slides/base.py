"""The one ``Slide`` type, and the backend interface every slide library is wrapped in.

A backend only opens a file, describes its pyramid and reads in-bounds regions as uint8 RGB.
Everything that must behave the same whatever the library (white outside the slide, the mpp
override, batched tiles and their resizing, thumbnails, one-line errors) lives in ``Slide``, so
that backends stay small and a test can inject a fake one.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Callable, ClassVar

import numpy as np

from fullslide.errors import SlideError
from fullslide.slides.grid import TileGeometry, level_region, level_to_level0

log = logging.getLogger(__name__)

#: Plausible mpp range for microscopy; values outside (e.g. 72 dpi defaults) are treated as missing.
MPP_RANGE = (0.01, 100.0)
#: Value of pixels outside the slide (and of transparent ones).
BACKGROUND = 255
#: Bytes of RGB read at once when building a thumbnail from a large level.
_BAND_BYTES = 64 * 2**20
#: Most pixels decoded for a thumbnail (2 Gpx, about 10 s of JPEG decoding on one core).
_THUMBNAIL_READ_PX = 2 * 2**30


class SlideBackend(abc.ABC):
    """A slide library behind the few calls ``Slide`` needs; one subclass per file."""

    name: ClassVar[str]

    @property
    @abc.abstractmethod
    def vendor(self) -> str:
        """Format or scanner vendor, e.g. ``aperio`` or ``generic-tiff``."""

    @property
    @abc.abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each pyramid level, level 0 first."""

    @property
    @abc.abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of each level relative to level 0."""

    @property
    @abc.abstractmethod
    def metadata_mpp(self) -> float | None:
        """Level-0 mpp from the file's metadata, or None when it has none."""

    @property
    def properties(self) -> Mapping[str, object]:
        """Raw metadata as the library reports it (for ``info``)."""
        return {}

    @abc.abstractmethod
    def read_region(self, level0_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        """uint8 [h, w, 3] read at ``level``; the region lies inside the level (Slide clips it)."""

    def close(self) -> None:
        """Release file handles."""


def valid_mpp(mpp_x: float | None, mpp_y: float | None = None) -> float | None:
    """One mpp from x/y metadata values, or None when absent or implausible."""
    values = [float(v) for v in (mpp_x, mpp_y) if v is not None]
    values = [v for v in values if math.isfinite(v) and MPP_RANGE[0] <= v <= MPP_RANGE[1]]
    if not values:
        return None
    if len(values) == 2 and abs(values[0] - values[1]) > 0.02 * max(values):
        log.warning("mpp differs between x (%g) and y (%g); using their mean", values[0], values[1])
    return float(sum(values) / len(values))


def mpp_from_resolution(x_resolution: object, y_resolution: object, unit: object) -> float | None:
    """mpp from TIFF XResolution/YResolution (pixels per unit) and ResolutionUnit, else None."""
    scale = {"centimeter": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0}.get(str(unit).lower().split(".")[-1])
    try:
        xres, yres = float(str(x_resolution)), float(str(y_resolution))
    except ValueError:
        return None
    if scale is None or xres <= 0 or yres <= 0:
        return None
    return valid_mpp(scale / xres, scale / yres)


class Slide:
    """A whole-slide image opened through one backend; use ``open_slide`` to get one."""

    def __init__(self, path: str | Path, backend: SlideBackend, *, mpp: float | None = None) -> None:
        from fullslide.slides.dicom import default_slide_id

        self.path = Path(path)
        self.slide_id = default_slide_id(self.path)
        self._backend = backend
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise SlideError(self.path, f"mpp must be a positive number, got {mpp!r}")
        self.mpp: float | None = float(mpp) if mpp is not None else backend.metadata_mpp
        self.mpp_source = "user" if mpp is not None else ("metadata" if self.mpp is not None else "none")
        dims = backend.level_dimensions
        if not dims or any(w < 1 or h < 1 for w, h in dims):
            raise SlideError(self.path, f"no readable image levels (dimensions {dims})")
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple((int(w), int(h)) for w, h in dims)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in backend.level_downsamples)

    # ---- description ----------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Name of the backend reading this slide."""
        return self._backend.name

    @property
    def vendor(self) -> str:
        """Format or scanner vendor reported by the backend."""
        return self._backend.vendor

    @property
    def properties(self) -> Mapping[str, object]:
        """Raw metadata of the backend."""
        return self._backend.properties

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    def require_mpp(self) -> float:
        """The level-0 mpp, or a SlideError telling how to supply it."""
        if self.mpp is None:
            raise SlideError(
                self.path,
                "no mpp (microns per pixel) in the file's metadata; pass it with --mpp VALUE "
                "(or an 'mpp' column in the input CSV, or open_slide(path, mpp=VALUE))",
            )
        return self.mpp

    # ---- reading --------------------------------------------------------------------------
    def read_region(self, level0_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        """uint8 RGB [h, w, 3] at ``level``, top-left at level-0 ``level0_xy``; white past the edge."""
        if not 0 <= level < self.level_count:
            raise SlideError(self.path, f"level {level} out of range (slide has {self.level_count})")
        width, height = int(size_wh[0]), int(size_wh[1])
        if width < 1 or height < 1:
            raise SlideError(self.path, f"region size must be positive, got {size_wh}")
        x0, y0 = int(level0_xy[0]), int(level0_xy[1])
        level_w, level_h = self.level_dimensions[level]
        downsample = self.level_downsamples[level]
        lx, ly = level_region((x0, y0), downsample)
        if lx >= 0 and ly >= 0 and lx + width <= level_w and ly + height <= level_h:
            return self._read_backend((x0, y0), level, (width, height))
        out = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
        vx0, vy0 = max(lx, 0), max(ly, 0)
        vx1, vy1 = min(lx + width, level_w), min(ly + height, level_h)
        if vx1 > vx0 and vy1 > vy0:
            inner = self._read_backend(level_to_level0((vx0, vy0), downsample), level, (vx1 - vx0, vy1 - vy0))
            out[vy0 - ly : vy1 - ly, vx0 - lx : vx1 - lx] = inner
        return out

    def _read_backend(self, level0_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        """Backend read with errors turned into a one-line SlideError."""
        try:
            region = self._backend.read_region(level0_xy, level, size_wh)
        except SlideError:
            raise
        except Exception as exc:
            raise self._read_error(exc, f"region {size_wh} at level {level}, level-0 {level0_xy}") from exc
        if region.shape != (size_wh[1], size_wh[0], 3) or region.dtype != np.uint8:
            raise SlideError(self.path, f"backend returned {region.shape} {region.dtype} for {size_wh}")
        return region

    def read_tiles(
        self, level0_xy: np.ndarray, geometry: TileGeometry, out: np.ndarray | None = None,
        channels_first: bool = False,
    ) -> np.ndarray:
        """Tiles at the given level-0 origins, uint8 [N, tile_px, tile_px, 3] ([N, 3, tile_px, tile_px] with
        ``channels_first``, the layout a model takes, made in the same pass where the backend can).

        Reads ``read_px`` squares at ``geometry.level`` and resizes them (antialiased) to
        ``tile_px`` when the level does not match the target mpp.
        """
        coords = np.asarray(level0_xy).reshape(-1, 2)
        tile_px, read_px = geometry.tile_px, geometry.read_px
        if geometry.level >= self.level_count:
            raise SlideError(self.path, f"geometry reads level {geometry.level}, slide has {self.level_count}")
        level, size = geometry.level, (read_px, read_px)
        level_w, level_h = self.level_dimensions[level]
        level_xy = np.floor(coords / self.level_downsamples[level] + 1e-9)
        inside = ((level_xy >= 0).all(axis=1) & (level_xy[:, 0] + read_px <= level_w)
                  & (level_xy[:, 1] + read_px <= level_h)).tolist()
        # the common case, in one vectorised pass where the backend can
        bulk = self._read_bulk(coords, level, size, channels_first) if read_px == tile_px and all(inside) else None
        if channels_first:
            return bulk if bulk is not None else np.ascontiguousarray(
                self.read_tiles(coords, geometry).transpose(0, 3, 1, 2))
        if out is None:
            out = np.empty((coords.shape[0], tile_px, tile_px, 3), dtype=np.uint8)
        elif out.shape != (coords.shape[0], tile_px, tile_px, 3) or out.dtype != np.uint8:
            raise ValueError(f"out must be uint8 {(coords.shape[0], tile_px, tile_px, 3)}, got {out.shape}")
        if bulk is not None:
            out[:] = bulk
            return out
        for i, (x, y) in enumerate(coords.tolist()):
            # in-bounds tiles (nearly all) skip read_region's checks and padding: this loop is the hot path
            region = self._read_backend((x, y), level, size) if inside[i] else self.read_region((x, y), level, size)
            out[i] = resize_rgb(region, (tile_px, tile_px)) if read_px != tile_px else region
        return out

    def _read_bulk(self, coords: np.ndarray, level: int, size: tuple[int, int],
                   channels_first: bool) -> np.ndarray | None:
        """The backend's ``read_regions`` for in-bounds regions (None if it has none), errors in one line."""
        bulk = getattr(self._backend, "read_regions", None)
        if not callable(bulk):
            return None
        try:
            return bulk([tuple(xy) for xy in coords.tolist()], level, size, channels_first=channels_first)
        except SlideError:
            raise
        except Exception as exc:
            raise self._read_error(exc, f"{len(coords)} regions {size} at level {level}") from exc

    def _read_error(self, exc: BaseException, what: str) -> SlideError:
        """A backend failure as one line naming the file (library errors vary: OpenSlideError, zlib, JPEG...)."""
        return SlideError(self.path, f"cannot read {what} ({type(exc).__name__}: {_one_line(exc)}); "
                                     "the file may be truncated or corrupt")

    def thumbnail(self, max_size: int, progress: Callable[[float], None] | None = None) -> np.ndarray:
        """The whole slide, uint8 [h, w, 3], longest side ``max_size`` (never upscaled).

        ``progress`` is called with the fraction read so far after each band (long reads on slides without a
        pyramid). Where the best level holds more than ``_THUMBNAIL_READ_PX`` pixels (a single-level TIFF of
        65,536 x 65,536 px), only every k-th band is decoded and the rows between repeat the nearest band read,
        so the time is bounded; a pyramid's coarser level is always preferred and read whole.
        """
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        width, height = self.dimensions
        downsample = max(1.0, max(width, height) / max_size)
        out_wh = (max(1, round(width / downsample)), max(1, round(height / downsample)))
        return self._read_downsampled(downsample, out_wh, progress)

    def _read_downsampled(
        self, downsample: float, out_wh: tuple[int, int], progress: Callable[[float], None] | None = None
    ) -> np.ndarray:
        """The whole slide at ``out_wh``, read in bands from the best level (bounded memory and time)."""
        # coarsest level still at least as fine as the wanted downsample (level 0 otherwise)
        level = max([0] + [i for i, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-6)])
        level_w, level_h = self.level_dimensions[level]
        factor = max(1, int(downsample / self.level_downsamples[level]))
        band_rows = max(factor, (_BAND_BYTES // (3 * level_w)) // factor * factor)
        starts = list(range(0, level_h, band_rows))
        every = max(1, math.ceil(level_w * level_h / _THUMBNAIL_READ_PX))  # decode 1 band in `every`
        parts: list[np.ndarray] = []
        band = None
        for i, ly in enumerate(starts):
            rows = min(band_rows, level_h - ly)
            if i % every == 0 or band is None:
                read = self.read_region(level_to_level0((0, ly), self.level_downsamples[level]), level, (level_w, rows))
                band = box_reduce(read, factor)
                if progress is not None:
                    progress(min(1.0, (i + 1) / len(starts)))
            parts.append(band[: -(-rows // factor)])  # a skipped band repeats the last one read
        reduced = np.concatenate(parts, axis=0)
        if reduced.shape[1::-1] == tuple(out_wh):
            return reduced
        return resize_rgb(reduced, out_wh)

    # ---- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the underlying file."""
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({str(self.path)!r}, backend={self.backend}, {w}x{h}, levels={self.level_count}, mpp={self.mpp})"


def box_reduce(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks (edge blocks padded by replication), uint8."""
    if factor == 1:
        return rgb
    h, w = rgb.shape[:2]
    ph, pw = -h % factor, -w % factor
    if ph or pw:
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")
    blocks = rgb.reshape(rgb.shape[0] // factor, factor, rgb.shape[1] // factor, factor, 3)
    # uint16 holds the sum of up to 257 uint8 values: half the memory of uint32 for the usual factors
    total = blocks.sum(axis=(1, 3), dtype=np.uint16 if factor <= 16 else np.uint32)
    return ((total + factor * factor // 2) // (factor * factor)).astype(np.uint8)


def resize_rgb(rgb: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Antialiased resize of uint8 RGB to ``size_wh`` (PIL bicubic, whose support widens when shrinking)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb))
    return np.asarray(image.resize((int(size_wh[0]), int(size_wh[1])), Image.Resampling.BICUBIC))


def _one_line(exc: BaseException) -> str:
    """The exception text on one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
