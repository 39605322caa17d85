"""Heatmap pieces: scales and their colour-bar ends, overlapping and smoothed score maps, annotation outlines from
GeoJSON and masks, the title, and the top/bottom gallery."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fullslide.viz.heatmap import (
    HeatmapHeader, HeatmapStyle, annotation_outlines, percentile_rank, render_heatmap, score_map, scaled,
    write_heatmap,
)


def test_scales_map_scores_and_report_the_colour_bar_ends() -> None:
    scores = np.array([0.5, 0.1, 0.3, 0.3])
    values, low, high = scaled(scores, "rank")
    assert (low, high) == (0.0, 1.0) and values.tolist() == [1.0, 0.0, 0.5, 0.5]  # ties share the mean rank
    values, low, high = scaled(scores, "minmax")
    assert (low, high) == (0.1, 0.5) and values == pytest.approx([1.0, 0.0, 0.5, 0.5])
    values, low, high = scaled(scores, "raw")
    assert (low, high) == (0.1, 0.5) and values.tolist() == scores.tolist()
    assert percentile_rank(np.array([7.0])).tolist() == [1.0]


def test_overlapping_tiles_average_and_smoothing_stays_inside_the_tissue() -> None:
    # two 4-px tiles on a 1:1 thumbnail overlapping by half: the shared columns hold the mean of both values
    grid, covered = score_map((8, 12), (12, 8), np.array([[0, 0], [2, 0]]), 4, np.array([0.0, 1.0]))
    assert grid[0, :2].tolist() == [0.0, 0.0] and grid[0, 2:4].tolist() == [0.5, 0.5] and grid[0, 4:6].tolist() == [1, 1]
    assert covered[:4, :6].all() and not covered[4:].any() and not covered[:, 6:].any()
    smooth, covered_s = score_map((8, 12), (12, 8), np.array([[0, 0], [2, 0]]), 4, np.array([0.0, 1.0]), 1.0)
    assert (covered_s == covered).all() and not smooth[~covered].any()
    assert 0 < smooth[0, 0] < smooth[0, 5] < 1  # blurred across the tiles, never towards the empty background


def test_render_blends_with_the_opacity_asked_for() -> None:
    thumb = np.full((8, 8, 3), 200, dtype=np.uint8)
    xy = np.array([[0, 0], [4, 0]])
    clear, _, _ = render_heatmap(thumb, (8, 8), xy, 4, np.array([0.0, 1.0]), style=HeatmapStyle(alpha=0.0))
    assert (clear == thumb).all()
    solid, _, _ = render_heatmap(thumb, (8, 8), xy, 4, np.array([0.0, 1.0]), style=HeatmapStyle(alpha=1.0))
    assert (solid[4:] == 200).all()  # no tile there: tissue untouched
    assert solid[0, 0, 2] > solid[0, 0, 0] and solid[0, 5, 0] > solid[0, 5, 2]  # coolwarm: low blue, high red


def test_annotation_outlines_from_qupath_geojson_and_from_a_mask(tmp_path: Path) -> None:
    from fullslide.slides.synth import make_layout, save_lesion_mask

    geo = tmp_path / "a.geojson"
    square = [[10, 10], [50, 10], [50, 40], [10, 40], [10, 10]]
    geo.write_text(json.dumps([{"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
        [square], [[[100, 100], [120, 100], [110, 130], [100, 100]]]]}}]))
    rings = annotation_outlines(geo)
    assert len(rings) == 2 and rings[0].tolist() == square
    layout = make_layout(1024, 1024, 0.5, seed=4, lesion_fraction=0.05)
    mask_png = tmp_path / "m.png"
    save_lesion_mask(mask_png, layout)
    outline = np.concatenate(annotation_outlines(mask_png))
    ys, xs = np.nonzero(layout.lesion_mask)
    ds = layout.layout_ds
    # the outline encloses the mask's pixels, in level-0 coordinates, within one mask pixel
    assert outline[:, 0].min() == pytest.approx(xs.min() * ds, abs=ds) and outline[:, 0].max() == pytest.approx((xs.max() + 1) * ds, abs=ds)
    assert outline[:, 1].min() == pytest.approx(ys.min() * ds, abs=ds)
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(Exception, match="no Polygon"):
        annotation_outlines(bad)


def test_write_heatmap_draws_the_map_the_gallery_of_extremes_and_the_geojson(tmp_path: Path) -> None:
    thumb = np.full((64, 64, 3), 230, dtype=np.uint8)
    xy = np.array([[x, y] for y in range(0, 64, 16) for x in range(0, 64, 16)])
    scores = np.linspace(0, 1, len(xy))
    asked = []

    def read_tiles(where: np.ndarray) -> np.ndarray:
        asked.append(where.copy())
        return np.zeros((len(where), 3, 16, 16), dtype=np.uint8)

    written = write_heatmap(tmp_path, "s1", thumb, (64, 64), xy, 16, {"attention": scores},
                            style=HeatmapStyle(top_k=3), header=HeatmapHeader("s1", "P(1) 0.9 -> 1", "1", "run, epoch 3"),
                            read_tiles=read_tiles)
    assert [p.name for p in written] == ["s1_attention.png", "s1_attention_gallery.png", "s1.geojson"]
    # the gallery reads the 3 highest tiles, then the 3 lowest, at their level-0 positions
    assert asked[0].tolist() == xy[[15, 14, 13, 0, 1, 2]].tolist()
    with pytest.raises(Exception, match="--scale"):
        write_heatmap(tmp_path, "s1", thumb, (64, 64), xy, 16, {"attention": scores}, style=HeatmapStyle(scale="log"))
