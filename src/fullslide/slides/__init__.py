"""Whole-slide I/O: one ``Slide`` type over OpenSlide, tiffslide or plain images; tile geometry at
a target mpp; tissue detection and tiling to CLAM/TRIDENT-style HDF5; synthetic cohorts.

The names below are imported lazily so that ``import fullslide.slides`` stays cheap (no slide
library, no h5py, never torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fullslide._lazy import lazy_exports

if TYPE_CHECKING:
    from fullslide.slides.base import Slide, SlideBackend
    from fullslide.slides.coords_io import read_coords, write_coords
    from fullslide.slides.grid import TileGeometry, plan_tile_geometry
    from fullslide.slides.open import open_slide
    from fullslide.slides.tiler import TileResult, TilingParams, tile_slides

_EXPORTS = {
    "open_slide": "fullslide.slides.open",
    "Slide": "fullslide.slides.base",
    "SlideBackend": "fullslide.slides.base",
    "TileGeometry": "fullslide.slides.grid",
    "plan_tile_geometry": "fullslide.slides.grid",
    "read_coords": "fullslide.slides.coords_io",
    "write_coords": "fullslide.slides.coords_io",
    "tile_slides": "fullslide.slides.tiler",
    "TileResult": "fullslide.slides.tiler",
    "TilingParams": "fullslide.slides.tiler",
}

__all__ = [
    "Slide",
    "SlideBackend",
    "TileGeometry",
    "TileResult",
    "TilingParams",
    "open_slide",
    "plan_tile_geometry",
    "read_coords",
    "tile_slides",
    "write_coords",
]


__getattr__, __dir__ = lazy_exports('fullslide.slides', _EXPORTS, globals())
