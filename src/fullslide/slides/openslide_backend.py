"""OpenSlide backend (openslide-python + the openslide-bin wheel: no system package needed)."""

from __future__ import annotations

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


def _float(value: object) -> float | None:
    """A metadata value as float, or None."""
    try:
        return float(str(value)) if value is not None else None
    except ValueError:
        return None
