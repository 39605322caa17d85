"""tiffslide backend: pure Python (tifffile + imagecodecs), reads TIFF-based formats."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import tiffslide

from fullslide.errors import SlideError
from fullslide.slides.base import SlideBackend, valid_mpp
from fullslide.slides.tiff_check import check_tiff


class TiffSlideBackend(SlideBackend):
    """Reads SVS, generic pyramidal TIFF, NDPI, SCN, BIF ... through tiffslide."""

    name: ClassVar[str] = "tiffslide"

    def __init__(self, path: Path) -> None:
        check_tiff(path)
        try:
            self._slide = tiffslide.TiffSlide(str(path))
            props = self._slide.properties
            self._dims = tuple(tuple(int(v) for v in wh) for wh in self._slide.level_dimensions)
            self._downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        except SlideError:
            raise
        except Exception as exc:  # tifffile/tiffslide raise ValueError, IndexError, NotImplementedError...
            raise SlideError(path, f"tiffslide cannot open it ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc
        self._props = props
        self._path = path

    @property
    def vendor(self) -> str:
        return str(self._props.get("tiffslide.vendor") or "generic-tiff")

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims  # type: ignore[return-value]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def metadata_mpp(self) -> float | None:
        return valid_mpp(self._props.get("tiffslide.mpp-x"), self._props.get("tiffslide.mpp-y"))  # type: ignore[arg-type]

    @property
    def properties(self) -> Mapping[str, object]:
        return dict(self._props)

    def read_region(self, level0_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        with warnings.catch_warnings():
            # Slide only asks for in-bounds regions; silence tiffslide's padding notice regardless
            warnings.simplefilter("ignore", UserWarning)
            region = self._slide.read_region(level0_xy, level, size_wh, as_array=True)
        return _as_rgb(np.asarray(region))

    def close(self) -> None:
        self._slide.close()


def _as_rgb(region: np.ndarray) -> np.ndarray:
    """Grey, grey+alpha, RGB or RGBA uint8 array -> RGB (alpha composited onto white)."""
    if region.dtype != np.uint8:
        raise ValueError(f"unsupported sample type {region.dtype} (only 8-bit slides are read)")
    if region.ndim == 2:
        return np.repeat(region[..., None], 3, axis=2)
    channels = region.shape[2]
    if channels == 3:
        return region
    if channels in (2, 4):
        colour = region[..., :-1] if channels == 4 else np.repeat(region[..., :1], 3, axis=2)
        a = region[..., -1:].astype(np.uint16)
        return ((colour.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    if channels == 1:
        return np.repeat(region, 3, axis=2)
    raise ValueError(f"unsupported channel count {channels}")
