"""Tissue detection on a thumbnail: Otsu on saturation, artefact removal, morphological clean-up.

H&E tissue is saturated pink/purple; glass is bright and grey; pen ink is green/blue (green
channel above red, which H&E never gives) and dust or folds are near black. Sizes are given in
micrometres and converted with the thumbnail's mpp, so the result does not depend on its scale.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage


@dataclasses.dataclass(frozen=True, kw_only=True)
class TissueParams:
    """Tissue-mask settings; areas in square micrometres, lengths in micrometres."""

    min_saturation: float = 0.07
    """Floor on the Otsu threshold, so a blank slide (only glass noise) yields no tissue."""
    max_saturation_threshold: float = 0.25
    """Ceiling on the Otsu threshold, so faint tissue next to strong stain is kept."""
    dark_max: int = 50
    """Pixels whose brightest channel is below this are artefacts (dust, folds, black ink)."""
    pen_margin: int = 12
    """Pixels whose green exceeds red by more than this are pen ink (green/blue markers)."""
    min_artefact_um2: float = 1000.0
    """An artefact is a region: dark or pen-coloured pieces smaller than this (a dense nucleus, a JPEG-tinted
    pixel) are tissue, not artefacts."""
    artefact_margin_um: float = 20.0
    """Artefact regions are dilated by this, to drop the anti-aliased rim of pen strokes."""
    closing_um: float = 16.0
    """Radius of the closing that bridges small gaps inside tissue."""
    min_area_um2: float = 4000.0
    """Connected tissue pieces smaller than this are dropped (dust, debris)."""
    max_hole_um2: float = 4000.0
    """Holes smaller than this inside tissue are filled."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_saturation <= self.max_saturation_threshold <= 1:
            raise ValueError("need 0 <= min_saturation <= max_saturation_threshold <= 1")
        for name in ("min_artefact_um2", "artefact_margin_um", "closing_um", "min_area_um2", "max_hole_um2"):
            if getattr(self, name) < 0:
                raise ValueError(f"TissueParams.{name} must be >= 0")


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1], float32 [h, w]."""
    rgb = np.asarray(rgb, dtype=np.float32)
    high = rgb.max(axis=2)
    low = rgb.min(axis=2)
    return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Otsu's threshold (maximal between-class variance) of ``values``; midpoint of the range if empty."""
    hist, edges = np.histogram(values, bins=bins, range=value_range)
    hist = hist.astype(np.float64)
    if hist.sum() == 0:
        return 0.5 * (value_range[0] + value_range[1])
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight0 = np.cumsum(hist)
    weight1 = hist.sum() - weight0
    sum0 = np.cumsum(hist * centres)
    mean0 = sum0 / np.maximum(weight0, 1e-12)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1e-12)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def artefact_mask(rgb: np.ndarray, params: TissueParams = TissueParams()) -> np.ndarray:
    """Near-black pixels and green/blue pen ink, bool [h, w] (pixels; :func:`tissue_mask` keeps regions only)."""
    rgb16 = np.asarray(rgb, dtype=np.int16)
    dark = rgb16.max(axis=2) < params.dark_max
    pen = (rgb16[..., 1] - rgb16[..., 0]) > params.pen_margin
    return dark | pen


def tissue_mask(rgb: np.ndarray, mask_mpp: float, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean tissue mask of a thumbnail whose pixels measure ``mask_mpp`` micrometres."""
    if mask_mpp <= 0:
        raise ValueError(f"mask_mpp must be positive, got {mask_mpp}")
    rgb = np.asarray(rgb)
    sat = saturation(rgb)
    artefacts = remove_small_objects(artefact_mask(rgb, params), params.min_artefact_um2 / mask_mpp**2)
    margin = _px(params.artefact_margin_um, mask_mpp)
    if margin > 0 and artefacts.any():
        artefacts = ndimage.binary_dilation(artefacts, structure=disk(margin))
    candidates = sat[~artefacts]
    threshold = otsu_threshold(candidates) if candidates.size else 1.0
    threshold = float(np.clip(threshold, params.min_saturation, params.max_saturation_threshold))
    mask = (sat > threshold) & ~artefacts
    mask = ndimage.binary_opening(mask, structure=disk(1))
    radius = _px(params.closing_um, mask_mpp)
    if radius > 0:
        # pad so that closing does not eat tissue touching the border
        padded = np.pad(mask, radius)
        mask = ndimage.binary_closing(padded, structure=disk(radius))[radius:-radius, radius:-radius]
    mask &= ~artefacts
    mask = fill_small_holes(mask, params.max_hole_um2 / mask_mpp**2)
    return remove_small_objects(mask, params.min_area_um2 / mask_mpp**2)


def remove_small_objects(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Drop 8-connected components smaller than ``min_area_px``."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area_px
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill background components that do not touch the border and are smaller than ``max_area_px``."""
    labels, count = ndimage.label(~mask)
    if count == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    fill = sizes < max_area_px
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill[border] = False
    fill[0] = False
    return mask | fill[labels]


def disk(radius: int) -> np.ndarray:
    """Boolean disk structuring element of the given radius in pixels."""
    r = max(0, int(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx * xx + yy * yy) <= r * r + r  # the +r rounds the outline like a drawn circle


def contour(mask: np.ndarray) -> np.ndarray:
    """The one-pixel inner boundary of a boolean mask."""
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), dtype=bool), border_value=0)


def _px(length_um: float, mpp: float) -> int:
    """A length in micrometres as whole pixels at ``mpp``."""
    return int(round(length_um / mpp))
