"""Tile augmentations for training: flips, 90-degree rotations, light blur, colour jitter, HED stain jitter.

HED jitter (Tellez et al. 2018, "Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference
to train distilled stain-invariant convolutional networks", IEEE TMI; and Tellez et al. 2019, MedIA 58): the tile
is unmixed into haematoxylin, eosin and DAB concentrations by colour deconvolution (Ruifrok & Johnston 2001,
Anal. Quant. Cytol. Histol. 23: optical density = -ln(RGB / 255) projected on the inverse of the stain matrix), each
concentration c becomes ``c * a + b`` with ``a ~ U(1 - hed_sigma, 1 + hed_sigma)`` and ``b ~ U(-hed_bias,
hed_bias)`` drawn per tile and stain, and the tile is mixed back. Their "HED-light" setting is 0.05 for both.

Each tile draws from its own generator keyed by (seed, epoch, slide, position of the tile in the slide's K
list), so a tile is augmented the same way whichever rank reads it and whatever the tile-parallel layout:
augmentation never breaks the equality of gradients across layouts, and a resumed run replays it.

Two implementations of the same draws: :func:`augment_batch` (torch, batched, on the device that runs the
encoder: what training uses, so loader workers only read and decode) and :func:`augment_tiles` (numpy, per tile:
the reference the batched one is tested against). The batched path uses only per-tile elementwise arithmetic
and per-tile shifts, so a tile's pixels do not depend on which other tiles share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Augment:
    """Augmentation settings (see ``AugmentConfig``)."""

    flip: bool = True
    rot90: bool = True
    blur_p: float = 0.2
    jitter: float = 0.05
    hed_sigma: float = 0.0
    hed_bias: float = 0.0

    @property
    def hed(self) -> bool:
        return self.hed_sigma > 0 or self.hed_bias > 0

    @property
    def active(self) -> bool:
        return self.flip or self.rot90 or self.blur_p > 0 or self.jitter > 0 or self.hed


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB; columns: R, G, B optical density), each
#: normalised to unit length; concentrations = OD @ inverse of this matrix.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
RGB_FROM_HED = (RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)).astype(np.float32)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED.astype(np.float64)).astype(np.float32)
_OD_FLOOR = 1.0  # RGB values are floored at 1 (of 255) before the logarithm: no infinite density


def hed_jitter(x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """float32 RGB [H, W, 3] (0..255) -> the same with each stain concentration scaled and shifted (per stain)."""
    od = -np.log(np.maximum(x, _OD_FLOOR) / np.float32(255.0))
    conc = od @ HED_FROM_RGB
    conc = conc * scale.astype(np.float32) + shift.astype(np.float32)
    return np.float32(255.0) * np.exp(-(conc @ RGB_FROM_HED))


def _blur(tile: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float32 [H, W, 3] tile (reflect padding)."""
    radius = max(1, int(round(2 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(tile, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    rows = sum(w * padded[i : i + tile.shape[0]] for i, w in enumerate(kernel))
    return sum(w * rows[:, i : i + tile.shape[1]] for i, w in enumerate(kernel))


def augment_tile(tile: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """One uint8 [H, W, 3] tile -> augmented uint8 [H, W, 3] (a new array)."""
    out = tile
    if aug.flip and rng.random() < 0.5:
        out = out[:, ::-1]
    if aug.flip and rng.random() < 0.5:
        out = out[::-1]
    if aug.rot90:
        out = np.rot90(out, int(rng.integers(4)))
    blur = aug.blur_p > 0 and rng.random() < aug.blur_p
    sigma = float(rng.uniform(0.3, 1.0))
    if aug.jitter > 0:
        b, c, s = rng.uniform(1 - aug.jitter, 1 + aug.jitter, size=3).astype(np.float32)
    if aug.hed:
        hed_scale = rng.uniform(1 - aug.hed_sigma, 1 + aug.hed_sigma, size=3)
        hed_shift = rng.uniform(-aug.hed_bias, aug.hed_bias, size=3)
    if not blur and aug.jitter <= 0 and not aug.hed:
        return np.ascontiguousarray(out)
    x = out.astype(np.float32)
    if blur:
        x = _blur(x, sigma)
    if aug.jitter > 0:
        x = x * b  # brightness
        x = (x - x.mean()) * c + x.mean()  # contrast
        gray = (x @ _LUMA)[..., None]
        x = gray + (x - gray) * s  # saturation
    if aug.hed:
        x = hed_jitter(np.clip(x, 0, 255), hed_scale, hed_shift)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def augment_tiles(
    tiles: np.ndarray, aug: Augment, *, seed: int, epoch: int, slide: int, positions: np.ndarray
) -> np.ndarray:
    """Augment uint8 [k, H, W, 3] tiles; ``positions`` are the tiles' places in the slide's K list."""
    if not aug.active:
        return tiles
    out = np.empty_like(tiles)
    for i, pos in enumerate(positions.tolist()):
        out[i] = augment_tile(tiles[i], aug, np.random.default_rng([seed, epoch, slide, pos, 3]))
    return out


@dataclass(frozen=True)
class TileDraws:
    """Every tile's random draws, ``[k]`` each (drawn on the host: a few scalars per tile)."""

    flip_w: np.ndarray  # bool
    flip_h: np.ndarray  # bool
    rot: np.ndarray  # int 0..3
    blur: np.ndarray  # bool
    sigma: np.ndarray  # float
    jitter: np.ndarray  # [k, 3] brightness, contrast, saturation factors (ones when off)
    hed_scale: np.ndarray  # [k, 3] per-stain concentration factors (ones when off)
    hed_shift: np.ndarray  # [k, 3] per-stain concentration offsets (zeros when off)


def draw(aug: Augment, *, seed: int, epoch: int, slide: int, positions: np.ndarray) -> TileDraws:
    """The draws of :func:`augment_tile`, in the same order from the same per-tile generators."""
    k = len(positions)
    fw, fh, blur = np.zeros(k, bool), np.zeros(k, bool), np.zeros(k, bool)
    rot, sigma, jit = np.zeros(k, np.int64), np.zeros(k, np.float64), np.ones((k, 3), np.float32)
    hed_scale, hed_shift = np.ones((k, 3), np.float64), np.zeros((k, 3), np.float64)
    for i, pos in enumerate(np.asarray(positions).tolist()):
        rng = np.random.default_rng([seed, epoch, slide, pos, 3])
        fw[i] = aug.flip and rng.random() < 0.5
        fh[i] = aug.flip and rng.random() < 0.5
        rot[i] = int(rng.integers(4)) if aug.rot90 else 0
        blur[i] = aug.blur_p > 0 and rng.random() < aug.blur_p
        sigma[i] = float(rng.uniform(0.3, 1.0))
        if aug.jitter > 0:
            jit[i] = rng.uniform(1 - aug.jitter, 1 + aug.jitter, size=3).astype(np.float32)
        if aug.hed:
            hed_scale[i] = rng.uniform(1 - aug.hed_sigma, 1 + aug.hed_sigma, size=3)
            hed_shift[i] = rng.uniform(-aug.hed_bias, aug.hed_bias, size=3)
    return TileDraws(fw, fh, rot, blur, sigma, jit, hed_scale, hed_shift)


def _gauss_weights(sigma: np.ndarray, blur: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-tile 1-D kernels ``[k, 2R + 1]`` on a common radius R (zeros beyond a tile's own radius; identity for
    tiles without blur), as :func:`_blur` builds them."""
    radii = np.where(blur, np.maximum(1, np.round(2 * sigma)).astype(int), 0)
    big = int(radii.max()) if len(radii) else 0
    weights = np.zeros((len(sigma), 2 * big + 1), np.float32)
    for i, (r, s) in enumerate(zip(radii, sigma)):
        if r == 0:
            weights[i, big] = 1.0
            continue
        x = np.arange(-r, r + 1, dtype=np.float32)
        kern = np.exp(-0.5 * (x / np.float32(s)) ** 2)
        weights[i, big - r : big + r + 1] = kern / kern.sum()
    return weights, big


def augment_batch(tiles: torch.Tensor, aug: Augment, *, seed: int, epoch: int, slide: int,
                  positions: np.ndarray) -> torch.Tensor:
    """Augment uint8 ``[k, 3, H, W]`` tiles on their device (square tiles); returns uint8 ``[k, 3, H, W]``."""
    if not aug.active or tiles.shape[0] == 0:
        return tiles
    d = draw(aug, seed=seed, epoch=epoch, slide=slide, positions=positions)
    dev = tiles.device
    out = tiles
    for mask, dims in ((d.flip_w, (3,)), (d.flip_h, (2,))):  # numpy's [H, W, 3] axes 1 and 0
        if mask.any():
            sel = torch.from_numpy(np.flatnonzero(mask)).to(dev)
            out = out.index_copy(0, sel, out.index_select(0, sel).flip(dims))
    for r in (1, 2, 3):  # np.rot90 on [H, W] axes = torch.rot90 on dims (2, 3)
        if (d.rot == r).any():
            sel = torch.from_numpy(np.flatnonzero(d.rot == r)).to(dev)
            out = out.index_copy(0, sel, torch.rot90(out.index_select(0, sel), r, dims=(2, 3)))
    if not d.blur.any() and aug.jitter <= 0 and not aug.hed:
        return out.contiguous()
    x = out.float()  # [k, 3, H, W]
    if d.blur.any():
        w, big = _gauss_weights(d.sigma, d.blur)
        w = torch.from_numpy(w).to(dev)[:, :, None, None, None]  # [k, taps, 1, 1, 1]
        pad = torch.nn.functional.pad(x, (0, 0, big, big), mode="reflect")
        x = sum(w[:, j] * pad[:, :, j : j + x.shape[2]] for j in range(w.shape[1]))
        pad = torch.nn.functional.pad(x, (big, big, 0, 0), mode="reflect")
        x = sum(w[:, j] * pad[:, :, :, j : j + x.shape[3]] for j in range(w.shape[1]))
    if aug.jitter > 0:
        b, c, s = (torch.from_numpy(d.jitter[:, i]).to(dev)[:, None, None, None] for i in range(3))
        x = x * b
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean
        luma = torch.tensor(_LUMA, device=dev)[None, :, None, None]
        gray = (x * luma).sum(1, keepdim=True)
        x = gray + (x - gray) * s
    if aug.hed:  # colour deconvolution per pixel: [k, 3, H, W] x [3, 3] on the channel axis, as hed_jitter
        to_hed, to_rgb = (torch.from_numpy(m).to(dev) for m in (HED_FROM_RGB, RGB_FROM_HED))
        scale, shift = (torch.from_numpy(v.astype(np.float32)).to(dev)[:, :, None, None] for v in (d.hed_scale,
                                                                                                  d.hed_shift))
        od = -torch.log(x.clamp(0, 255).clamp_min(_OD_FLOOR) / 255.0)
        conc = torch.einsum("kchw,cs->kshw", od, to_hed) * scale + shift
        x = 255.0 * torch.exp(-torch.einsum("kshw,sc->kchw", conc, to_rgb))
    return (x + 0.5).clamp_(0, 255).to(torch.uint8)
