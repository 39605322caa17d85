"""Pure-numpy tile geometry: level choice, read sizes, grids, box coverage, HDF5 attributes."""

from __future__ import annotations

import numpy as np
import pytest

from fullslide.slides.grid import (
    TileGeometry,
    box_coverage,
    choose_level,
    grid_level0_xy,
    level_region,
    level_to_level0,
    plan_tile_geometry,
)


@pytest.mark.parametrize(
    ("slide_mpp", "downsamples", "target_mpp", "tile_px", "level", "read_px", "level0_px"),
    [
        # 0.499 is within 5% of 0.5: read as is, no resampling
        (0.499, [1.0], 0.5, 224, 0, 224, 224),
        (0.524, [1.0], 0.5, 224, 0, 224, 224),
        (0.476, [1.0], 0.5, 224, 0, 224, 224),
        # 40x slide with 4x pyramid: level 1 (0.97) is too coarse, read 448 at level 0 and shrink
        (0.25, [1.0, 4.0, 16.0], 0.5, 224, 0, 448, 448),
        (0.2425, [1.0, 4.0, 16.0], 0.5, 224, 0, 462, 462),
        # 2x pyramid: level 1 is exactly 0.5 -> matched at level 1
        (0.25, [1.0, 2.0, 8.0], 0.5, 224, 1, 224, 448),
        # target 1.0: best level at or finer is level 1 (0.5), read 448 there
        (0.25, [1.0, 2.0, 8.0], 1.0, 224, 1, 448, 896),
        # target 2.0 on 0.5 with 2x levels: level 2 matches
        (0.5, [1.0, 2.0, 4.0, 8.0], 2.0, 256, 2, 256, 1024),
        # target between levels: level 1 (1.0) is finer than 1.5, level 2 (2.0) is coarser
        (0.5, [1.0, 2.0, 4.0], 1.5, 100, 1, 150, 300),
        # slide coarser than the target by > 5%: level 0, upsampled
        (0.6, [1.0, 4.0], 0.5, 224, 0, 187, 187),
        # non-integer downsample of an odd-sized level
        (0.5, [1.0, 2.0006, 4.001], 1.0, 224, 1, 224, 448),
    ],
)
def test_plan_tile_geometry(slide_mpp, downsamples, target_mpp, tile_px, level, read_px, level0_px) -> None:
    geometry = plan_tile_geometry(slide_mpp, downsamples, target_mpp, tile_px)
    assert (geometry.level, geometry.read_px, geometry.level0_px) == (level, read_px, level0_px)
    assert geometry.needs_resize == (read_px != tile_px)
    # the effective tile mpp is the target within the tolerance (or the rounding of read_px)
    assert geometry.tile_mpp == pytest.approx(target_mpp, rel=0.06)


def test_resize_factor_and_level_mpp() -> None:
    geometry = plan_tile_geometry(0.25, [1.0, 4.0], target_mpp=0.5, tile_px=224)
    assert geometry.level_mpp == 0.25
    assert geometry.read_px / geometry.tile_px == 2.0  # shrink by 2 to reach 0.5 mpp
    assert geometry.tile_mpp == pytest.approx(0.5)


def test_match_tolerance_is_configurable() -> None:
    assert plan_tile_geometry(0.499, [1.0], 0.5, 224, match_tolerance=0.0).read_px == 224  # rounds to 224 anyway
    strict = plan_tile_geometry(0.48, [1.0], 0.5, 224, match_tolerance=0.01)
    assert strict.read_px == round(224 * 0.5 / 0.48) == 233
    assert plan_tile_geometry(0.48, [1.0], 0.5, 224).read_px == 224


def test_choose_level_prefers_coarsest_usable_level() -> None:
    assert choose_level(0.25, [1, 2, 4, 8], 1.1) == (2, False)  # 1.0 mpp is finer than 1.1 by 9%
    assert choose_level(0.25, [1, 2, 4, 8], 1.0) == (2, True)
    assert choose_level(0.25, [1, 2, 4, 8], 0.1) == (0, False)  # nothing fine enough: level 0
    assert choose_level(0.25, [1, 2, 4, 8], 100.0) == (3, False)


@pytest.mark.parametrize("bad", [dict(slide_mpp=0), dict(slide_mpp=float("nan")), dict(target_mpp=-1), dict(tile_px=0)])
def test_plan_tile_geometry_rejects_bad_values(bad: dict) -> None:
    kwargs = dict(slide_mpp=0.5, level_downsamples=[1.0], target_mpp=0.5, tile_px=224) | bad
    with pytest.raises(ValueError):
        plan_tile_geometry(**kwargs)


def test_geometry_attrs_roundtrip_and_clam_names() -> None:
    geometry = plan_tile_geometry(0.25, [1.0, 4.0], 0.5, 224)
    attrs = geometry.to_attrs()
    assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == 448 and attrs["patch_level"] == 0
    assert list(attrs["downsample"]) == [1.0, 1.0]
    assert TileGeometry.from_attrs(attrs) == geometry
    with pytest.raises(KeyError):
        TileGeometry.from_attrs({k: v for k, v in attrs.items() if k != "read_px"})


def test_grid_covers_slide_including_partial_edge_tiles() -> None:
    xy = grid_level0_xy((1000, 500), 224)
    assert xy.dtype == np.int64 and xy.shape == (5 * 3, 2)
    assert xy[:5, 0].tolist() == [0, 224, 448, 672, 896] and set(xy[:5, 1]) == {0}
    assert xy[-1].tolist() == [896, 448]
    assert grid_level0_xy((448, 448), 224, stride_px=112).shape == (16, 2)


def test_box_coverage_exact_on_fractional_boxes() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :5] = True  # left half of a 10x10 mask; 4 level-0 px per mask px
    xy = np.array([[0, 0], [10, 0], [18, 0], [20, 0], [36, 36], [-20, 0]])
    cov = box_coverage(mask, xy, 8, 4)
    # [0,8) all lesion; [10,18) all; [18,26): 2 of 8 px inside [0,20); [20,28) none; outside the mask: 0
    np.testing.assert_allclose(cov, [1.0, 1.0, 0.25, 0.0, 0.0, 0.0])
    # a box half outside the mask counts the outside as 0
    np.testing.assert_allclose(box_coverage(np.ones((10, 10)), np.array([[30, 0]]), 20, 4), [0.5])
    # anisotropic scale: 40 px spans the whole mask width at 4 px/mask px, its left half at 8
    np.testing.assert_allclose(box_coverage(mask, np.array([[0, 0]]), 40, 4), [0.5])
    np.testing.assert_allclose(box_coverage(mask, np.array([[0, 0]]), 40, (8, 4)), [1.0])


def test_box_coverage_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((40, 30)) > 0.6
    xy = rng.integers(-20, 130, size=(50, 2))
    fine = np.repeat(np.repeat(mask, 4, axis=0), 4, axis=1)  # level-0 resolution (4 px per mask px)
    padded = np.zeros((400, 400), dtype=float)
    padded[100 : 100 + fine.shape[0], 100 : 100 + fine.shape[1]] = fine
    expected = [padded[y + 100 : y + 113, x + 100 : x + 113].mean() for x, y in xy]
    np.testing.assert_allclose(box_coverage(mask, xy, 13, 4), expected, atol=1e-12)


@pytest.mark.parametrize("downsample", [1.0, 2.0, 4.0, 1.9993, 2.0007, 3.999])
def test_level_to_level0_inverts_level_region(downsample: float) -> None:
    for value in range(0, 5000, 37):
        level0 = level_to_level0((value, value), downsample)
        assert level_region(level0, downsample) == (value, value)
