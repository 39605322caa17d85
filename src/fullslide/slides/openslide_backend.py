"""OpenSlide backend (openslide-python + the openslide-bin wheel: no system package needed)."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import openslide

from fullslide.errors import SlideError
from fullslide.slides.base import SlideBackend, mpp_from_resolution, valid_mpp
from fullslide.slides.tiff_check import check_tiff


class OpenSlideBackend(SlideBackend):
    """Reads every format OpenSlide knows (Aperio, Hamamatsu, MIRAX, generic tiled TIFF, ...)."""

    name: ClassVar[str] = "openslide"

    def __init__(self, path: Path) -> None:
        check_tiff(path)
        if openslide.OpenSlide.detect_format(str(path)) is None:
            raise SlideError(path, "not a slide format OpenSlide recognises")
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            raise SlideError(path, f"OpenSlide cannot open it ({' '.join(str(exc).split())})") from exc
        self._path = path

    @property
    def vendor(self) -> str:
        return str(self._slide.properties.get(openslide.PROPERTY_NAME_VENDOR) or "unknown")

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._slide.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self._slide.level_downsamples)

    @property
    def metadata_mpp(self) -> float | None:
        props = self._slide.properties
        mpp = valid_mpp(_float(props.get(openslide.PROPERTY_NAME_MPP_X)), _float(props.get(openslide.PROPERTY_NAME_MPP_Y)))
        if mpp is None and "tiff.XResolution" in props:
            mpp = mpp_from_resolution(
                props.get("tiff.XResolution"), props.get("tiff.YResolution"), props.get("tiff.ResolutionUnit")
            )
        return mpp

    @property
    def properties(self) -> Mapping[str, object]:
        return dict(self._slide.properties)

    def read_region(self, level0_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        regions = self.read_regions([level0_xy], level, size_wh)
        return regions[0] if regions is not None else self._read_pil(level0_xy, level, size_wh)

    def _read_direct(self, level0_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        """One region through :meth:`read_regions` (OpenSlide's C reader straight into numpy, no PIL image)."""
        return self.read_regions([level0_xy], level, size_wh)[0]

    def read_regions(self, level0_xys: list[tuple[int, int]], level: int, size_wh: tuple[int, int],
                     channels_first: bool = False) -> np.ndarray | None:
        """Many same-sized regions at once, uint8 ``[n, h, w, 3]`` (``[n, 3, h, w]`` with ``channels_first``):
        every region is read by OpenSlide's C function straight into one buffer of premultiplied ARGB words
        (B, G, R, A bytes) and converted in one vectorised pass per channel (None where the direct reader is
        unavailable). As fast as a bare ``read_region``, which stops at a PIL image."""
        if _DIRECT is None or not hasattr(self._slide, "_osr") or min(size_wh) <= 0:
            return None
        (width, height), n = size_wh, len(level0_xys)
        buf = np.empty((n, height, width), dtype=np.uint32)
        stride = height * width * 4
        base = buf.ctypes.data
        for i, (x, y) in enumerate(level0_xys):
            _DIRECT(self._slide._osr, ctypes.cast(base + i * stride, _UINT32_P), int(x), int(y), int(level),
                    width, height)
        bgra = buf.view(np.uint8).reshape(n, height, width, 4)
        out = np.empty((n, 3, height, width) if channels_first else (n, height, width, 3), dtype=np.uint8)
        planes = out if channels_first else np.moveaxis(out, 3, 1)  # [n, 3, h, w] view either way
        for c in range(3):  # one plane at a time: 3x faster than copying the reversed-channel view
            planes[:, c] = bgra[..., 2 - c]
        alpha = bgra[..., 3]
        partial = np.flatnonzero(alpha.min(axis=(1, 2)) < 255)  # (an empty list of regions gives none)
        for i in partial.tolist():  # rare: transparent pixels composite onto white (premultiplied c + 255 - a)
            white = 255 - alpha[i].astype(np.uint16)
            white = white[None] if channels_first else white[..., None]
            out[i] = (out[i].astype(np.uint16) + white).clip(0, 255)
        return out

    def _read_pil(self, level0_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        image = self._slide.read_region(level0_xy, level, size_wh)  # PIL RGBA, not premultiplied
        width, height = size_wh
        # PIL packs RGB and A straight from its buffer; far cheaper than np.asarray + slicing RGBA
        rgb = np.frombuffer(image.tobytes("raw", "RGB"), dtype=np.uint8).reshape(height, width, 3)
        alpha = np.frombuffer(image.tobytes("raw", "A"), dtype=np.uint8).reshape(height, width, 1)
        if alpha.min() == 255:
            return rgb
        # transparent pixels (outside scanned areas) composite onto white, as Slide pads
        a = alpha.astype(np.uint16)
        return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


def _direct_reader():  # -> the ctypes function, or None where openslide-python's internals differ
    try:
        from openslide import lowlevel

        function = lowlevel._read_region
        return function if len(function.argtypes) == 7 else None
    except (ImportError, AttributeError, TypeError):
        return None


_DIRECT = _direct_reader()
_UINT32_P = ctypes.POINTER(ctypes.c_uint32)


def _float(value: object) -> float | None:
    """A metadata value as float, or None."""
    try:
        return float(str(value)) if value is not None else None
    except ValueError:
        return None
