"""fastslide backend (optional: ``pip install fastslide``): a C++ reader with a Python binding.

Chosen by name (``--backend fastslide`` / ``data.backend: fastslide``), never by "auto": its JPEG decoding
differs from OpenSlide's by a few grey levels (BENCHMARKS.md, tile reading), so runs keep OpenSlide's pixels
unless asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

from fullslide.errors import SlideError
from fullslide.slides.base import SlideBackend, valid_mpp
from fullslide.slides.tiffslide_backend import _as_rgb


class FastSlideBackend(SlideBackend):
    """Reads SVS, NDPI, MRXS, generic TIFF, DICOM ... through fastslide."""

    name: ClassVar[str] = "fastslide"

    def __init__(self, path: Path) -> None:
        try:
            import fastslide
        except ImportError:
            raise SlideError(path, "backend 'fastslide' is not installed (pip install fastslide)") from None
        try:
            self._slide = fastslide.FastSlide.from_file_path(str(path))
            self._dims = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
            self._downsamples = tuple(float(d) for d in self._slide.level_downsamples)
            mpp = self._slide.mpp
            self._mpp = valid_mpp(*(float(v) for v in mpp)) if mpp and all(v for v in mpp) else None
            self._vendor = str(self._slide.format or "unknown").lower()
        except Exception as exc:  # the binding raises RuntimeError / ValueError with a message
            raise SlideError(path, f"fastslide cannot open it ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc

    @property
    def vendor(self) -> str:
        return self._vendor

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def metadata_mpp(self) -> float | None:
        return self._mpp

    @property
    def properties(self) -> Mapping[str, object]:
        return dict(self._slide.properties)

    def read_region(self, level0_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        x, y = self._slide.convert_level0_to_level_native(int(level0_xy[0]), int(level0_xy[1]), int(level))
        region = self._slide.read_region((int(x), int(y)), int(level), (int(size_wh[0]), int(size_wh[1])))
        return _as_rgb(np.asarray(region.numpy()))

    def close(self) -> None:
        self._slide.close()
