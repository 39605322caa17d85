"""Stain normalisation: Macenko and Reinhard, fitted once per slide from its tissue, applied on the device.

``data.stain_normalize: macenko | reinhard | none``. Each slide's stain statistics are fitted once from pixels of
up to :data:`FIT_TILES` of its tissue tiles (evenly spaced over its tile list, so the fit is deterministic) and stored
in ``stain_<method>.json`` next to the run's tiles (training, eval, heatmaps), the extracted features (``extract``:
the frozen baseline sees the same pixels as the end-to-end run) or the predictions (``predict``). The tiles of a
slide are then mapped to the reference's stains on the encoder's device, before augmentation, as uint8 tiles.

- **Macenko** (Macenko et al. 2009, "A method for normalizing histology slides for quantitative analysis", ISBI):
  optical density ``OD = -ln((I + 1) / Io)`` with ``Io = 240``; pixels whose OD exceeds ``beta = 0.15`` in every
  channel; the plane of the two largest eigenvectors of their OD covariance; the extreme angles (``alpha = 1``
  and 99th percentiles) in that plane give the haematoxylin and eosin vectors (haematoxylin: the one with the
  larger red OD); concentrations by least squares and their 99th percentiles ``maxC``. Normalising maps
  ``C * maxC_ref / maxC_slide`` through the reference's stain vectors. The default reference (no
  ``data.stain_reference``) is the one of the widely used reference implementation (M. Veta's
  ``normalizeStaining``): ``HE = [[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]``,
  ``maxC = [1.9705, 1.0308]``.
- **Reinhard** (Reinhard et al. 2001, "Color transfer between images", IEEE CG&A 21(5)): RGB -> LMS (their
  matrix) -> log10 -> lαβ; each lαβ channel is standardised with the slide's tissue mean/std and rescaled to the
  reference's. Tissue pixels: mean OD over the channels above ``beta``. Needs ``data.stain_reference``.

``data.stain_reference`` is a tile image (PNG/JPEG, all its tissue pixels) or a slide (fitted like any slide).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fullslide.errors import ConfigError, SlideError

METHODS = ("none", "macenko", "reinhard")
IO = 240.0  # Macenko's transmitted light intensity
BETA = 0.15  # OD threshold of tissue pixels
ALPHA = 1.0  # percentile of the extreme angles
FIT_TILES = 32  # tiles per slide read for the fit
MAX_FIT_PIXELS = 2**19  # pixels per fit (a regular subsample of the tiles' tissue pixels)
#: Macenko reference of the reference implementation (see module docstring).
MACENKO_REF = {"he": [[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]], "max_c": [1.9705, 1.0308]}
#: Reinhard et al. 2001, eq. 4 (RGB -> LMS) and the lαβ decorrelation (eq. 6).
RGB_TO_LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
LMS_TO_LAB = np.diag([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)]) @ np.array(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]])
_LOG_FLOOR = 1e-6  # LMS values are floored before log10 (black pixels)


def fit(method: str, pixels: np.ndarray) -> dict[str, Any]:
    """Stain statistics of uint8 RGB ``pixels`` ``[N, 3]`` (tissue and background; background is dropped)."""
    rgb = np.asarray(pixels, dtype=np.float64).reshape(-1, 3)
    if method == "macenko":
        return fit_macenko(rgb)
    if method == "reinhard":
        return fit_reinhard(rgb)
    raise ConfigError(f"data.stain_normalize: unknown method {method!r} (choose from {', '.join(METHODS)})")


def _tissue_od(rgb: np.ndarray, all_channels: bool) -> np.ndarray:
    od = -np.log((rgb + 1.0) / IO)
    keep = (od > BETA).all(axis=1) if all_channels else od.mean(axis=1) > BETA
    if keep.sum() < 100:
        raise ValueError(f"too little stained tissue to fit stains ({int(keep.sum())} pixels above OD {BETA})")
    return od[keep]


def fit_macenko(rgb: np.ndarray) -> dict[str, Any]:
    """Macenko's stain vectors ``he`` [3, 2] (columns H, E) and 99th-percentile concentrations ``max_c`` [2]."""
    od = _tissue_od(rgb, all_channels=True)
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, [1, 2]]  # eigh sorts ascending: the two largest
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive OD
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [ALPHA, 100 - ALPHA])
    v1 = plane @ np.array([math.cos(lo), math.sin(lo)])
    v2 = plane @ np.array([math.cos(hi), math.sin(hi)])
    he = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)  # H: larger red OD
    he = he / np.linalg.norm(he, axis=0, keepdims=True)
    conc, *_ = np.linalg.lstsq(he, od.T, rcond=None)  # [2, N]
    return {"he": he.tolist(), "max_c": np.percentile(conc, 99, axis=1).tolist()}


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Reinhard's lαβ of RGB (0-255) ``[..., 3]``."""
    lms = np.maximum(rgb @ RGB_TO_LMS.T, _LOG_FLOOR)
    return np.log10(lms) @ LMS_TO_LAB.T


def fit_reinhard(rgb: np.ndarray) -> dict[str, Any]:
    """Mean and standard deviation of the lαβ channels over the tissue pixels."""
    keep = (-np.log((rgb + 1.0) / IO)).mean(axis=1) > BETA
    if keep.sum() < 100:
        raise ValueError(f"too little stained tissue to fit stains ({int(keep.sum())} pixels above OD {BETA})")
    lab = rgb_to_lab(rgb[keep])
    return {"mean": lab.mean(axis=0).tolist(), "std": np.maximum(lab.std(axis=0), 1e-6).tolist()}


@dataclass(frozen=True)
class StainNormalizer:
    """Maps a slide's tiles to the reference's stains: ``normalizer(tiles, slide_params)`` on any device."""

    method: str
    reference: Mapping[str, Any]

    def __call__(self, tiles: torch.Tensor, params: Mapping[str, Any] | None) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` tiles of one slide (``params``: its fit) -> uint8 ``[B, 3, H, W]``."""
        if params is None or tiles.shape[0] == 0:
            return tiles
        x = tiles.float()
        dev = x.device
        if self.method == "macenko":
            src = torch.tensor(params["he"], dtype=torch.float64)
            ref = torch.tensor(self.reference["he"], dtype=torch.float64)
            ratio = torch.tensor(self.reference["max_c"], dtype=torch.float64) / torch.tensor(params["max_c"],
                                                                                              dtype=torch.float64)
            # OD -> C = pinv(HE_src) OD -> C * ratio -> HE_ref C: one 3 x 3 map on the channel axis
            m = (ref @ torch.diag(ratio) @ torch.linalg.pinv(src)).to(dev, torch.float32)
            od = -torch.log((x + 1.0) / IO)
            x = IO * torch.exp(-torch.einsum("ij,bjhw->bihw", m, od))
        elif self.method == "reinhard":
            to_lms, to_lab = (torch.tensor(a, dtype=torch.float32, device=dev) for a in (RGB_TO_LMS, LMS_TO_LAB))
            from_lab = torch.linalg.inv(torch.tensor(LMS_TO_LAB)).to(dev, torch.float32)
            from_lms = torch.linalg.inv(torch.tensor(RGB_TO_LMS)).to(dev, torch.float32)
            mean_s, std_s, mean_r, std_r = (torch.tensor(v, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
                                            for v in (params["mean"], params["std"], self.reference["mean"],
                                                      self.reference["std"]))
            lms = torch.einsum("ij,bjhw->bihw", to_lms, x).clamp_min(_LOG_FLOOR)
            lab = torch.einsum("ij,bjhw->bihw", to_lab, torch.log10(lms))
            lab = (lab - mean_s) / std_s * std_r + mean_r
            x = torch.einsum("ij,bjhw->bihw", from_lms, 10.0 ** torch.einsum("ij,bjhw->bihw", from_lab, lab))
        else:
            raise ConfigError(f"data.stain_normalize: unknown method {self.method!r}")
        return (x + 0.5).clamp_(0, 255).to(torch.uint8)


# ---- fitting slides and references -------------------------------------------------------------------------
def slide_pixels(slide_path: str | Path, coords_h5: str | Path, *, backend: str = "auto", mpp: float | None = None,
                 tiles: int = FIT_TILES) -> np.ndarray:
    """uint8 ``[N, 3]`` pixels of up to ``tiles`` of a slide's tiles, evenly spaced over its tile list."""
    from fullslide.slides import open_slide, read_coords

    coords, geometry = read_coords(coords_h5)
    if len(coords) == 0:
        raise ValueError("no tiles to fit stains on")
    pick = np.unique(np.linspace(0, len(coords) - 1, min(tiles, len(coords))).round().astype(int))
    with open_slide(slide_path, backend=backend, mpp=mpp) as slide:
        px = slide.read_tiles(coords[pick], geometry).reshape(-1, 3)
    step = max(1, len(px) // MAX_FIT_PIXELS)
    return px[::step]


def check_reference(method: str, reference: str | None) -> None:
    """ConfigError when the settings cannot work: Reinhard without a reference, a reference that is missing."""
    if method not in METHODS:
        raise ConfigError(f"data.stain_normalize: unknown method {method!r} (choose from {', '.join(METHODS)})")
    if method == "reinhard" and not reference:
        raise ConfigError("data.stain_normalize: reinhard needs data.stain_reference (a tile image or a slide)")
    if reference and not Path(reference).expanduser().exists():
        raise ConfigError(f"data.stain_reference: {Path(reference).expanduser()}: file not found")


def reference_params(method: str, reference: str | None, *, backend: str = "auto", target_mpp: float = 0.5,
                     tile_px: int = 224) -> dict[str, Any]:
    """The reference's statistics: Macenko's default, a tile image's, or a slide's (tiled like any slide)."""
    check_reference(method, reference)
    if not reference:
        return dict(MACENKO_REF)
    path = Path(reference).expanduser()
    try:
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            from PIL import Image

            with Image.open(path) as im:
                return fit(method, np.asarray(im.convert("RGB")).reshape(-1, 3))
        import tempfile

        from fullslide.slides.tiler import tile_slides

        with tempfile.TemporaryDirectory() as tmp:
            (result,) = tile_slides([path], Path(tmp), target_mpp=target_mpp, tile_px=tile_px, backend=backend)
            if result.failed or not result.n_tiles:
                raise ValueError(result.message or "no tissue tiles")
            return fit(method, slide_pixels(path, result.h5_path, backend=backend))
    except (ValueError, SlideError, OSError) as exc:
        raise ConfigError(f"data.stain_reference: {path}: cannot fit {method} stains ({exc})") from exc


def store_path(folder: str | Path, method: str) -> Path:
    return Path(folder) / f"stain_{method}.json"


def load_store(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # unreadable: fitted again


def save_store(path: Path, store: Mapping[str, Any]) -> None:
    from fullslide.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(store, indent=1, sort_keys=True))
