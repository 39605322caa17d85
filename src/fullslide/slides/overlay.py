"""The tiling preview: slide thumbnail with the tissue contour and the kept tiles drawn on it."""

from __future__ import annotations

import numpy as np

from fullslide.slides.base import resize_rgb
from fullslide.slides.tissue import contour

CONTOUR_RGB = (0, 170, 0)
TILE_RGB = (30, 60, 220)


def draw_overlay(
    thumbnail: np.ndarray,
    tissue: np.ndarray,
    level0_xy: np.ndarray,
    level0_px: int,
    level0_wh: tuple[int, int],
) -> np.ndarray:
    """uint8 RGB copy of ``thumbnail`` with the mask contour (green) and tile outlines (blue)."""
    from PIL import Image, ImageDraw

    height, width = thumbnail.shape[:2]
    mask = np.asarray(tissue, dtype=bool)
    if mask.shape != (height, width):
        mask = resize_rgb(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2), (width, height))[..., 0] > 127
    image = Image.fromarray(np.ascontiguousarray(thumbnail))
    draw = ImageDraw.Draw(image)
    sx, sy = width / level0_wh[0], height / level0_wh[1]
    for x, y in np.asarray(level0_xy).reshape(-1, 2).tolist():
        x0, y0 = x * sx, y * sy
        draw.rectangle((x0, y0, x0 + level0_px * sx, y0 + level0_px * sy), outline=TILE_RGB, width=1)
    out = np.array(image)
    edge = contour(mask)
    if width > 400:  # thicken the outline on large previews so it stays visible
        from scipy import ndimage

        edge = ndimage.binary_dilation(edge)
    out[edge] = CONTOUR_RGB
    return out
