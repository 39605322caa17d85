"""Procedural H&E-like texture, rendered region by region from a small per-slide layout.

Every pixel is a pure function of its level-0 position, the slide's seed and a coarse layout
(signed distances to the tissue and lesion boundaries, a few hundred to a few thousand pixels a
side). Noise and nucleus positions come from integer hashing of grid cells rather than from a
stateful generator, so any region renders on its own, identically whichever way the slide is
cut into strips: that is what lets a 100,000 px slide be written strip by strip.

Colour follows Beer-Lambert: optical density = hematoxylin x H vector + eosin x E vector.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

#: Ruifrok & Johnston stain vectors (optical density per unit stain, R G B), normalised.
H_OD = np.array([0.650, 0.704, 0.286], dtype=np.float32)
E_OD = np.array([0.072, 0.990, 0.105], dtype=np.float32)
GLASS_RGB = 244.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Appearance:
    """Texture constants in physical units, plus per-slide stain and signal settings."""

    nucleus_spacing_um: float = 6.0
    """Side of the hash cells that each hold at most one nucleus."""
    normal_density: float = 0.28
    """Probability that a cell of normal tissue holds a nucleus."""
    lesion_density: float = 0.75
    """Same, inside a lesion: denser nuclei."""
    normal_sigma_um: float = 1.3
    """Gaussian radius of a normal nucleus."""
    lesion_sigma_um: float = 2.3
    """Gaussian radius of a lesion nucleus: larger."""
    normal_darkness: float = 0.9
    """Peak hematoxylin density of a normal nucleus."""
    lesion_darkness: float = 1.3
    """Peak hematoxylin density of a lesion nucleus: darker."""
    h_scale: float = 1.0
    """Per-slide (per-patient) hematoxylin staining intensity."""
    e_scale: float = 1.0
    """Per-slide (per-patient) eosin staining intensity."""
    h_od: tuple[float, float, float] | None = None
    """The haematoxylin's optical-density vector (None: Ruifrok & Johnston's ``H_OD``): a site's stain."""
    e_od: tuple[float, float, float] | None = None
    """The eosin's optical-density vector (None: ``E_OD``)."""
    diffuse: float = 0.0
    """Strength of the diffuse signal (0 = none): more nuclei, bluer background, everywhere."""
    lesion_contrast: float = 1.0
    """How much a lesion's background differs from normal tissue (1 = full, 0 = not at all); see ``subtle``."""

    def subtle(self, contrast: float) -> "Appearance":
        """The same look with lesions ``contrast`` of the way from normal tissue to the default lesion (0..1]:
        nucleus density, size and darkness and the lesion's background tint all move together."""
        def mix(normal: float, lesion: float) -> float:
            return normal + contrast * (lesion - normal)

        return dataclasses.replace(
            self, lesion_contrast=contrast, lesion_density=mix(self.normal_density, self.lesion_density),
            lesion_sigma_um=mix(self.normal_sigma_um, self.lesion_sigma_um),
            lesion_darkness=mix(self.normal_darkness, self.lesion_darkness))


@dataclasses.dataclass(frozen=True)
class SlideLayout:
    """The coarse plan of one slide; ``tissue_sdf``/``lesion_sdf`` are in level-0 pixels (>0 inside)."""

    width: int
    height: int
    mpp: float
    seed: int
    layout_ds: int
    tissue_sdf: np.ndarray
    lesion_sdf: np.ndarray
    appearance: Appearance

    @property
    def tissue_mask(self) -> np.ndarray:
        """Coarse tissue mask, bool [ceil(h / ds), ceil(w / ds)]."""
        return self.tissue_sdf > 0

    @property
    def lesion_mask(self) -> np.ndarray:
        """Coarse lesion mask (ground truth), bool, same grid as ``tissue_mask``."""
        return self.lesion_sdf > 0


def layout_downsample(width: int, height: int, max_grid_px: int = 2048) -> int:
    """Power-of-two level-0 pixels per layout pixel: at least 8, grid at most ``max_grid_px``."""
    ds = 8
    while max(width, height) / ds > max_grid_px:
        ds *= 2
    return ds


def make_layout(
    width: int,
    height: int,
    mpp: float,
    seed: int,
    *,
    tissue_fraction: float = 0.35,
    lesion_fraction: float = 0.0,
    n_foci: int | None = None,
    appearance: Appearance = Appearance(),
) -> SlideLayout:
    """Tissue islands covering about ``tissue_fraction`` of the slide, and lesion foci covering
    ``lesion_fraction`` of the tissue (0 = none), all drawn from ``seed``."""
    ds = layout_downsample(width, height)
    gw, gh = math.ceil(width / ds), math.ceil(height / ds)
    rng = np.random.default_rng([seed, 1])
    field = ndimage.gaussian_filter(rng.standard_normal((gh, gw)), sigma=max(gw, gh) / 12, mode="reflect")
    field /= field.std() + 1e-12
    yy, xx = np.mgrid[0:gh, 0:gw]
    ry, rx = (yy + 0.5) / gh * 2 - 1, (xx + 0.5) / gw * 2 - 1
    field -= 1.5 * (rx**2 + ry**2) ** 2  # islands gather away from the slide border
    inside = field > np.quantile(field, 1 - tissue_fraction)
    tissue_sdf = _signed_distance(inside) * ds
    lesion_sdf = np.full((gh, gw), -1e6, dtype=np.float32)
    if lesion_fraction > 0:
        lesion_sdf = _lesion_foci(inside, tissue_sdf / ds, lesion_fraction, n_foci, rng) * ds
    return SlideLayout(width, height, float(mpp), int(seed), ds, tissue_sdf.astype(np.float32),
                       lesion_sdf.astype(np.float32), appearance)


def _signed_distance(inside: np.ndarray) -> np.ndarray:
    """Distance to the mask boundary in grid pixels: positive inside, negative outside."""
    if inside.all():
        return np.full(inside.shape, 1e6, dtype=np.float32)
    if not inside.any():
        return np.full(inside.shape, -1e6, dtype=np.float32)
    return (ndimage.distance_transform_edt(inside) - ndimage.distance_transform_edt(~inside) + 0.5 * ~inside
            - 0.5 * inside).astype(np.float32)


def _lesion_foci(
    inside: np.ndarray, tissue_sdf: np.ndarray, fraction: float, n_foci: int | None, rng: np.random.Generator
) -> np.ndarray:
    """Signed distance (grid px) of a few irregular round foci inside tissue, scaled by bisection
    so that they cover ``fraction`` of the tissue area."""
    target = fraction * inside.sum()
    count = int(n_foci) if n_foci else int(rng.integers(2, 5))
    count = max(1, min(count, int(target // 12) or 1))  # tiny targets: fewer, not invisibly small, foci
    deep = np.argwhere(tissue_sdf > max(1.0, 0.25 * tissue_sdf.max()))
    centres = deep[rng.choice(len(deep), size=count, replace=len(deep) < count)]
    weights = rng.uniform(0.6, 1.4, size=count)
    phases = rng.uniform(0, 2 * np.pi, size=(count, 2))
    yy, xx = np.mgrid[0 : inside.shape[0], 0 : inside.shape[1]].astype(np.float32)
    shapes = []
    for (cy, cx), w, (p1, p2) in zip(centres, weights, phases):
        dist = np.hypot(yy - cy, xx - cx)
        theta = np.arctan2(yy - cy, xx - cx)
        shapes.append((w * (1 + 0.2 * np.sin(3 * theta + p1) + 0.1 * np.sin(5 * theta + p2)), dist))

    def sdf(scale: float) -> np.ndarray:
        blob = np.max([radius * scale - dist for radius, dist in shapes], axis=0)
        return np.minimum(blob, tissue_sdf)

    low, high = 0.0, float(max(inside.shape))
    for _ in range(40):
        mid = 0.5 * (low + high)
        if (sdf(mid) > 0).sum() < target:
            low = mid
        else:
            high = mid
    return sdf(high)


def render_region(layout: SlideLayout, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """uint8 RGB [height, width, 3] of the slide's level 0 at (x0, y0)."""
    look = layout.appearance
    mpp, seed = layout.mpp, layout.seed
    um = 1.0 / mpp  # pixels per micrometre
    xs = np.arange(x0, x0 + width, dtype=np.float64)
    ys = np.arange(y0, y0 + height, dtype=np.float64)
    ragged = (value_noise(xs, ys, 20 * um, 20 * um, seed, 1) - 0.5) * 16 * um
    tissue = _ramp(upsample(layout.tissue_sdf, xs, ys, layout.layout_ds) + ragged, 2 * um)
    holes = value_noise(xs, ys, 28 * um, 22 * um, seed, 2)
    tissue *= _ramp(0.86 - holes, 0.02)  # small lumens and fat vacuoles
    lesion = _ramp(upsample(layout.lesion_sdf, xs, ys, layout.layout_ds), 2 * um)
    coarse = value_noise(xs, ys, 45 * um, 45 * um, seed, 3)
    fibres = value_noise(xs, ys, 3 * um, 16 * um, seed, 4)
    eosin = (0.22 + 0.30 * coarse + 0.20 * fibres) * (1 - 0.3 * look.lesion_contrast * lesion) * (1 - 0.05 * look.diffuse)
    haem = 0.05 + 0.05 * coarse + 0.10 * look.lesion_contrast * lesion + 0.05 * look.diffuse + _nuclei(layout, x0, y0, width, height)
    h_od = H_OD if look.h_od is None else np.asarray(look.h_od, dtype=np.float32)
    e_od = E_OD if look.e_od is None else np.asarray(look.e_od, dtype=np.float32)
    od = tissue[..., None] * (haem[..., None] * (look.h_scale * h_od) + eosin[..., None] * (look.e_scale * e_od))
    rgb = GLASS_RGB * np.exp(-od)
    grain = value_noise(xs, ys, 1.0, 1.0, seed, 5) - 0.5  # per-pixel grain, also position-determined
    rgb += (4.0 * grain)[..., None]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _nuclei(layout: SlideLayout, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """Hematoxylin density of the nuclei in a region, float32 [height, width].

    One candidate nucleus per hash cell (random offset, size, darkness); it exists with a
    probability set by the tissue and lesion fields at its centre. Candidates from a margin
    around the region are included so that nuclei cut by a strip edge render whole.
    """
    look = layout.appearance
    um = 1.0 / layout.mpp
    cell = max(2.0, look.nucleus_spacing_um * um)
    sigmas = (look.normal_sigma_um * um, look.lesion_sigma_um * um)
    margin = int(math.ceil(3 * max(sigmas) + 2))
    ex0, ey0, ew, eh = x0 - margin, y0 - margin, width + 2 * margin, height + 2 * margin
    cx = np.arange(math.floor(ex0 / cell), math.floor((ex0 + ew) / cell) + 1, dtype=np.int64)
    cy = np.arange(math.floor(ey0 / cell), math.floor((ey0 + eh) / cell) + 1, dtype=np.int64)
    mesh_x, mesh_y = np.meshgrid(cx, cy)
    gx, gy = mesh_x.ravel(), mesh_y.ravel()
    px = (gx + hash01(gx, gy, layout.seed, 10)) * cell
    py = (gy + hash01(gx, gy, layout.seed, 11)) * cell
    tissue = _ramp(sample(layout.tissue_sdf, px, py, layout.layout_ds), 2 * um)
    lesion = _ramp(sample(layout.lesion_sdf, px, py, layout.layout_ds), 2 * um)
    in_lesion = hash01(gx, gy, layout.seed, 12) < lesion
    density = np.where(in_lesion, look.lesion_density, look.normal_density * (1 + 0.35 * look.diffuse))
    keep = hash01(gx, gy, layout.seed, 13) < tissue * density
    jitter = 0.7 + 0.6 * hash01(gx, gy, layout.seed, 14)
    ix = np.floor(px - ex0).astype(np.int64)
    iy = np.floor(py - ey0).astype(np.int64)
    keep &= (ix >= 0) & (ix < ew) & (iy >= 0) & (iy < eh)
    out = np.zeros((height, width), dtype=np.float32)
    for group, sigma, darkness in ((~in_lesion, sigmas[0], look.normal_darkness), (in_lesion, sigmas[1], look.lesion_darkness)):
        sel = keep & group
        if not sel.any():
            continue
        impulses = np.zeros((eh, ew), dtype=np.float32)
        # weight 2*pi*sigma^2 gives a blob whose peak equals the nucleus darkness
        np.add.at(impulses, (iy[sel], ix[sel]), (darkness * jitter[sel] * 2 * np.pi * sigma**2).astype(np.float32))
        blurred = ndimage.gaussian_filter(impulses, sigma, truncate=3.0, mode="constant")
        out += blurred[margin : margin + height, margin : margin + width]
    cap = max(look.normal_darkness, look.lesion_darkness)
    return (cap * np.tanh(2.0 * out / cap)).astype(np.float32)  # saturating: blobs look like discs


def _ramp(signed_px: np.ndarray, width_px: float) -> np.ndarray:
    """0 outside, 1 inside, a linear edge ``width_px`` wide centred on 0."""
    return np.clip(0.5 + signed_px / max(width_px, 1e-6), 0.0, 1.0).astype(np.float32)


# ---- position-determined noise -----------------------------------------------------------------
_K1, _K2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place on uint64."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def hash01(ix: np.ndarray, iy: np.ndarray, seed: int, channel: int) -> np.ndarray:
    """Uniform [0, 1) float64 from integer cell coordinates (broadcast), a seed and a channel."""
    salt = _mix(np.array([(seed * 1_000_003 + channel * 7919) % 2**64], dtype=np.uint64))[0]
    x = np.asarray(ix, dtype=np.int64).view(np.uint64) * _K1
    x = x ^ (np.asarray(iy, dtype=np.int64).view(np.uint64) * _K2) ^ salt
    return (_mix(x) >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def value_noise(xs: np.ndarray, ys: np.ndarray, cell_x: float, cell_y: float, seed: int, channel: int) -> np.ndarray:
    """Smooth value noise in [0, 1], float32 [len(ys), len(xs)], from hashed cell corners."""
    fx, fy = xs / cell_x, ys / cell_y
    gx0, gy0 = int(math.floor(fx[0])), int(math.floor(fy[0]))
    gxs = np.arange(gx0, int(math.floor(fx[-1])) + 2, dtype=np.int64)
    gys = np.arange(gy0, int(math.floor(fy[-1])) + 2, dtype=np.int64)
    corners = hash01(gxs[None, :], gys[:, None], seed, channel).astype(np.float32)
    ix = np.floor(fx).astype(np.int64) - gx0
    iy = np.floor(fy).astype(np.int64) - gy0
    tx = _smooth(fx - np.floor(fx))
    ty = _smooth(fy - np.floor(fy))
    rows = corners[:, ix] * (1 - tx) + corners[:, ix + 1] * tx
    return rows[iy] * (1 - ty)[:, None] + rows[iy + 1] * ty[:, None]


def _smooth(t: np.ndarray) -> np.ndarray:
    """Smoothstep weights (continuous slope across cell borders)."""
    return (t * t * (3 - 2 * t)).astype(np.float32)


def upsample(grid: np.ndarray, xs: np.ndarray, ys: np.ndarray, ds: int) -> np.ndarray:
    """Bilinear value of a coarse grid (one value per ``ds`` level-0 px) at pixel rows x columns."""
    ix, tx = _coarse_index(xs, ds, grid.shape[1])
    iy, ty = _coarse_index(ys, ds, grid.shape[0])
    rows = grid[iy] * (1 - ty)[:, None] + grid[np.minimum(iy + 1, grid.shape[0] - 1)] * ty[:, None]
    return rows[:, ix] * (1 - tx) + rows[:, np.minimum(ix + 1, grid.shape[1] - 1)] * tx


def sample(grid: np.ndarray, px: np.ndarray, py: np.ndarray, ds: int) -> np.ndarray:
    """Bilinear value of a coarse grid at scattered level-0 points."""
    ix, tx = _coarse_index(px, ds, grid.shape[1])
    iy, ty = _coarse_index(py, ds, grid.shape[0])
    ix1, iy1 = np.minimum(ix + 1, grid.shape[1] - 1), np.minimum(iy + 1, grid.shape[0] - 1)
    top = grid[iy, ix] * (1 - tx) + grid[iy, ix1] * tx
    bottom = grid[iy1, ix] * (1 - tx) + grid[iy1, ix1] * tx
    return top * (1 - ty) + bottom * ty


def _coarse_index(coords: np.ndarray, ds: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid index and weight of level-0 coordinates (grid values sit at cell centres)."""
    u = np.clip((coords + 0.5) / ds - 0.5, 0.0, size - 1)
    i = np.floor(u).astype(np.int64)
    return i, (u - i).astype(np.float32)
