"""Tissue detection: tissue kept, glass, pen ink and black artefacts dropped; real-slide tiles on tissue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fullslide.slides import open_slide, plan_tile_geometry, read_coords, tile_slides
from fullslide.slides.tissue import TissueParams, otsu_threshold, saturation, tissue_mask


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A 400 x 400 thumbnail at 8 mpp: two tissue blobs, a green and a blue pen stroke, a black blob, dust."""
    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal(242, 3, (400, 400, 3)), 0, 255).astype(np.uint8)  # glass with noise
    yy, xx = np.mgrid[0:400, 0:400]
    tissue = ((yy - 130) ** 2 + (xx - 130) ** 2 < 80**2) | ((yy - 280) ** 2 / 60**2 + (xx - 270) ** 2 / 100**2 < 1)
    pink = np.array([215, 140, 195]) + rng.normal(0, 12, (400, 400, 3))
    purple = np.array([120, 80, 170]) + rng.normal(0, 12, (400, 400, 3))
    nuclei = rng.random((400, 400)) < 0.15
    rgb[tissue] = np.clip(np.where(nuclei[..., None], purple, pink), 0, 255).astype(np.uint8)[tissue]
    rgb[30:45, 200:390] = (40, 150, 60)  # green pen stroke on glass
    rgb[120:135, 40:220] = (50, 80, 190)  # blue pen across the first tissue blob
    rgb[330:370, 30:70] = (15, 15, 15)  # black artefact
    rgb[350:352, 350:352] = (180, 100, 170)  # a speck of dust-coloured debris, too small to be tissue
    return rgb, tissue


def test_tissue_mask_keeps_tissue_and_drops_artefacts() -> None:
    rgb, truth = _scene()
    mask = tissue_mask(rgb, mask_mpp=8.0)
    assert mask[truth].mean() > 0.85  # tissue found (minus the pen stroke crossing it)
    assert not mask[30:45, 200:390].any()  # green pen
    assert not mask[122:133, 60:200].any()  # blue pen over tissue
    assert not mask[330:370, 30:70].any()  # black blob
    assert not mask[345:357, 345:357].any()  # small debris
    assert mask[~truth].mean() < 0.01  # glass


def test_blank_slide_has_no_tissue() -> None:
    glass = np.clip(np.random.default_rng(1).normal(240, 4, (300, 300, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass, mask_mpp=8.0).any()


def test_otsu_separates_two_modes() -> None:
    values = np.concatenate([np.full(100, 0.05), np.full(50, 0.6)])
    assert 0.05 < otsu_threshold(values) <= 0.6
    assert saturation(np.array([[[255, 0, 0], [128, 128, 128]]], dtype=np.uint8)).tolist() == [[1.0, 0.0]]


def test_tissue_params_validate() -> None:
    with pytest.raises(ValueError):
        TissueParams(min_saturation=0.5, max_saturation_threshold=0.2)


def test_real_svs_tiles_land_on_tissue_not_background(real_svs: Path, tmp_path: Path) -> None:
    (result,) = tile_slides([real_svs], tmp_path, target_mpp=0.5, tile_px=224)
    assert result.status == "ok" and result.n_tiles >= 20
    coords, geometry = read_coords(result.h5_path)
    assert geometry.level == 0 and geometry.read_px == 224 and not geometry.needs_resize  # 0.499 reads as 0.5
    slide = open_slide(real_svs)
    tiles = slide.read_tiles(coords, geometry)
    sat = saturation(tiles.reshape(-1, 224, 3)).reshape(len(tiles), -1)
    tissue_share = (sat > 0.1).mean(axis=1)  # share of saturated (stained) pixels per tile
    assert tissue_share.min() > 0.25 and np.median(tissue_share) > 0.6
    assert tiles.reshape(len(tiles), -1).mean(axis=1).max() < 225  # no white tile
    # tiles of the grid that were not kept include glass: bright and unsaturated
    grid = {tuple(c) for c in coords.tolist()}
    rejected = np.array([(x, y) for y in range(0, 2967 - 224, 224) for x in range(0, 2220 - 224, 224) if (x, y) not in grid])
    rejected_tiles = slide.read_tiles(rejected, geometry)
    rejected_share = (saturation(rejected_tiles.reshape(-1, 224, 3)).reshape(len(rejected), -1) > 0.1).mean(axis=1)
    assert (rejected_share < 0.05).sum() >= 20  # plenty of pure-glass tiles exist, and none was kept


def test_tissue_threshold_controls_kept_tiles(real_svs: Path, tmp_path: Path) -> None:
    loose = tile_slides([real_svs], tmp_path / "a", tissue_threshold=0.1)[0].n_tiles
    strict = tile_slides([real_svs], tmp_path / "b", tissue_threshold=0.9)[0].n_tiles
    assert loose > strict > 0
    geometry = plan_tile_geometry(0.499, [1.0])
    assert geometry.level0_px == 224


REAL_SVS = Path(__file__).parent / "data" / "cmu_small_region.svs"


def test_kept_tissue_on_the_real_slide_does_not_depend_on_tile_size_or_mpp(tmp_path: Path) -> None:
    """The mask is made at a fixed physical resolution, and dense nuclei are not artefacts: the level-0 area of
    the kept tiles agrees within 15% from 32 to 512 px and from 0.5 to 2.0 mpp (wherever at least 8 tiles fit)."""
    areas = {}
    for mpp, px in [(0.5, 32), (0.5, 64), (0.5, 224), (0.5, 512), (1.0, 32), (1.0, 128), (2.0, 32), (2.0, 128)]:
        result = tile_slides([REAL_SVS], tmp_path / f"{mpp}_{px}", target_mpp=mpp, tile_px=px)[0]
        coords, geometry = read_coords(result.h5_path)
        areas[(mpp, px)] = len(coords) * geometry.level0_px**2
    low, high = min(areas.values()), max(areas.values())
    assert high <= 1.15 * low, areas
    assert low > 1.5e6, areas  # the epidermis and the stroma are kept (0.84 Mpx at 64 px before the fix)


def test_isolated_dark_pixels_are_tissue_not_artefacts() -> None:
    rgb, tissue = _scene()
    rng = np.random.default_rng(1)
    dots = rng.random(tissue.shape) < 0.02  # single near-black pixels (dense nuclei at a fine scale)
    speckled = rgb.copy()
    speckled[dots & tissue] = (30, 20, 45)
    assert tissue_mask(speckled, 2.0)[tissue].mean() > 0.9 * tissue_mask(rgb, 2.0)[tissue].mean()
