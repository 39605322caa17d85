"""Synthetic cohorts: real pyramidal TIFFs, determinism, focal and diffuse signals, bounded memory."""

from __future__ import annotations

import csv
import dataclasses
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fullslide.cli import main
from fullslide.errors import ConfigError
from fullslide.slides import open_slide, read_coords, tile_slides
from fullslide.slides.synth import lesion_fraction, load_lesion_mask, make_cohort, write_slide
from fullslide.slides.synth_render import Appearance, make_layout, render_region


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path) as fh:
        return list(csv.DictReader(fh))


def _haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Optical density along the hematoxylin direction (a crude colour deconvolution)."""
    od = -np.log(np.maximum(rgb.astype(np.float64), 1.0) / 255.0)
    return od @ np.array([0.65, 0.70, 0.29]) - od @ np.array([0.07, 0.99, 0.11]) * 0.5


def test_cohort_csv_patients_and_files(synth_cohort: Path) -> None:
    rows = _rows(synth_cohort)
    assert list(rows[0]) == ["slide_id", "path", "label", "patient_id", "signal", "lesion_mask"]
    assert len(rows) == 4 and {r["label"] for r in rows} == {"0", "1"}
    patients = [r["patient_id"] for r in rows]
    assert len(set(patients)) < len(patients)  # some patient has two slides
    for row in rows:
        assert not Path(row["path"]).is_absolute() and (synth_cohort.parent / row["path"]).is_file()
        same_patient = [r for r in rows if r["patient_id"] == row["patient_id"]]
        assert {r["label"] for r in same_patient} == {row["label"]}
        assert bool(row["lesion_mask"]) == (row["label"] == "1")


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_synthetic_tiff_is_a_real_pyramid(synth_slide: Path, backend: str) -> None:
    import tifffile

    slide = open_slide(synth_slide, backend=backend)
    assert slide.level_count >= 3
    assert slide.level_dimensions[:3] == ((1536, 1536), (768, 768), (384, 384))
    assert slide.level_downsamples[:3] == (1.0, 2.0, 4.0)
    assert slide.mpp == pytest.approx(0.5)
    with tifffile.TiffFile(synth_slide) as tif:
        assert all(p.is_tiled and p.tilewidth == 256 and p.compression == 7 for p in tif.pages)  # 7 = JPEG
    # each level is the downsampled image of level 0 (not an independent rendering)
    level0 = slide.read_region((0, 0), 0, (1536, 1536)).astype(float)
    level2 = slide.read_region((0, 0), 2, (384, 384)).astype(float)
    assert np.abs(level0.reshape(384, 4, 384, 4, 3).mean(axis=(1, 3)) - level2).mean() < 4


def test_same_seed_same_cohort_other_seed_differs(tmp_path: Path) -> None:
    kwargs = dict(signal="focal", size=(512, 512), lesion_fraction=0.1, positive_fraction=1.0)
    a = make_cohort(tmp_path / "a", 2, seed=3, **kwargs)
    b = make_cohort(tmp_path / "b", 2, seed=3, **kwargs)
    c = make_cohort(tmp_path / "c", 2, seed=4, **kwargs)
    assert a.read_text() == b.read_text()
    for row in _rows(a):
        pa, pb, pc = (d.parent / row["path"] for d in (a, b, c))
        assert pa.read_bytes() == pb.read_bytes()
        pixels_a = open_slide(pa).read_region((0, 0), 0, (512, 512))
        assert not np.array_equal(pixels_a, open_slide(pc).read_region((0, 0), 0, (512, 512)))
        assert (a.parent / row["lesion_mask"]).read_bytes() == (b.parent / row["lesion_mask"]).read_bytes()


def test_rendering_does_not_depend_on_how_the_slide_is_cut() -> None:
    layout = make_layout(700, 500, 0.5, seed=9, lesion_fraction=0.1)
    whole = render_region(layout, 0, 0, 700, 500)
    pieces = np.concatenate([np.concatenate([render_region(layout, x, y, min(300, 700 - x), min(170, 500 - y))
                                             for x in range(0, 700, 300)], axis=1) for y in range(0, 500, 170)], axis=0)
    np.testing.assert_array_equal(whole, pieces)


def test_focal_lesions_cover_the_requested_share_and_look_different(synth_cohort: Path, tmp_path: Path) -> None:
    rows = [r for r in _rows(synth_cohort) if r["label"] == "1"]
    results = tile_slides([synth_cohort.parent / r["path"] for r in rows], tmp_path, target_mpp=0.5, tile_px=64)
    for row, result in zip(rows, results):
        coords, geometry = read_coords(result.h5_path)
        mask_path = synth_cohort.parent / row["lesion_mask"]
        cover = lesion_fraction(mask_path, coords, geometry.level0_px)
        share = (cover > 0.5).mean()
        assert 0.03 <= share <= 0.12, share  # requested 0.06 of tissue
        mask, downsample = load_lesion_mask(mask_path)
        np.testing.assert_allclose(cover, lesion_fraction(mask, coords, geometry.level0_px, mask_downsample=downsample))
        # lesion tiles: darker, denser nuclei -> more hematoxylin and more very dark pixels
        tiles = open_slide(synth_cohort.parent / row["path"]).read_tiles(coords, geometry)
        lesion, normal = tiles[cover > 0.75], tiles[cover == 0]
        assert len(lesion) >= 2
        assert _haematoxylin(lesion).mean() > _haematoxylin(normal).mean() + 0.2
        dark = lambda t: (t[..., 1] < 100).mean()
        assert dark(lesion) > 3 * dark(normal)
    with pytest.raises(ValueError, match="mask_downsample"):
        lesion_fraction(np.zeros((4, 4), bool), np.zeros((1, 2)), 64)


def test_negative_focal_slides_have_no_lesion() -> None:
    layout = make_layout(1024, 1024, 0.5, seed=1, lesion_fraction=0.0)
    assert not layout.lesion_mask.any() and layout.tissue_mask.mean() == pytest.approx(0.35, abs=0.02)


def test_diffuse_signal_shifts_every_tissue_tile() -> None:
    layout = make_layout(1024, 1024, 0.5, seed=5)
    shifted = make_layout(1024, 1024, 0.5, seed=5, appearance=Appearance(diffuse=1.0))
    assert np.array_equal(layout.tissue_sdf, shifted.tissue_sdf)  # same slide, only the signal differs
    plain, positive = render_region(layout, 0, 0, 1024, 1024), render_region(shifted, 0, 0, 1024, 1024)
    tissue = np.repeat(np.repeat(layout.tissue_mask, 8, 0), 8, 1)[:1024, :1024]
    deltas = []
    for y in range(0, 1024, 64):
        for x in range(0, 1024, 64):
            if tissue[y : y + 64, x : x + 64].mean() > 0.9:
                deltas.append(_haematoxylin(positive[y : y + 64, x : x + 64]).mean() - _haematoxylin(plain[y : y + 64, x : x + 64]).mean())
    assert len(deltas) > 30 and min(deltas) > 0.01  # present in every tissue tile
    assert np.median(deltas) < 0.15  # and subtle (lesions shift by > 0.2)


def test_diffuse_cohort_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["synth", "--out", str(tmp_path), "--slides", "3", "--size", "512x384", "--signal", "diffuse", "--seed", "2"])
    assert code == 0
    csv_path = Path(capsys.readouterr().out.strip())
    rows = _rows(csv_path)
    assert csv_path == tmp_path / "labels.csv" and len(rows) == 3
    assert all(r["signal"] == "diffuse" and r["lesion_mask"] == "" for r in rows)
    assert open_slide(tmp_path / rows[0]["path"]).dimensions == (512, 384)
    with pytest.raises(SystemExit) as info:  # argparse rejects a slide count of 0
        main(["synth", "--out", str(tmp_path), "--slides", "0"])
    assert info.value.code == 2


def test_synth_rejects_bad_parameters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path), "--slides", "2", "--lesion-fraction", "0.9"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "lesion fraction must be in (0, 0.5]" in line


def test_writing_is_streamed_with_bounded_memory(tmp_path: Path) -> None:
    """Peak traced memory must not grow with the slide's height (strips, not whole images)."""

    def peak(height: int) -> int:
        layout = make_layout(1024, height, 0.5, seed=0)
        tracemalloc.start()
        try:
            write_slide(tmp_path / f"h{height}.tiff", layout)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, tall = peak(1024), peak(12288)
    assert tall < 1.3 * small, (small, tall)
    assert tall < 1024 * 12288 * 3  # below the size of the image it wrote
    assert open_slide(tmp_path / "h12288.tiff").level_dimensions[0] == (1024, 12288)


def test_stain_variation_spreads_patient_stains_and_is_validated(tmp_path: Path) -> None:
    from fullslide.errors import ConfigError
    from fullslide.slides.synth import make_cohort, plan_cohort

    def spread(variation: float) -> float:
        plan = plan_cohort(30, signal="focal", lesion_fraction=0.03, positive_fraction=0.5, seed=0,
                           diffuse_strength=1.0, stain_variation=variation)
        scales = [s.appearance.h_scale for s in plan]
        return max(scales) - min(scales)

    assert spread(0.0) == 0.0
    assert 0.5 < spread(0.35) <= 0.7 and spread(0.12) <= 0.24
    with pytest.raises(ConfigError, match="stain variation must be in"):
        make_cohort(tmp_path, 2, size=(512, 512), stain_variation=1.5)


def test_lesion_contrast_moves_lesions_towards_normal_tissue() -> None:
    """A lower contrast keeps the lesions where they are but makes them look more like normal tissue."""
    layouts = {c: make_layout(1024, 1024, 0.5, seed=3, lesion_fraction=0.1, appearance=Appearance().subtle(c))
               for c in (1.0, 0.4)}
    assert np.array_equal(layouts[1.0].lesion_sdf, layouts[0.4].lesion_sdf)
    lesion = np.repeat(np.repeat(layouts[1.0].lesion_mask, 8, 0), 8, 1)[:1024, :1024]
    normal = ~np.repeat(np.repeat(layouts[1.0].tissue_mask & ~layouts[1.0].lesion_mask, 8, 0), 8, 1)[:1024, :1024]
    gap = {}
    for c, layout in layouts.items():
        h = _haematoxylin(render_region(layout, 0, 0, 1024, 1024))
        gap[c] = h[lesion].mean() - h[~normal].mean()
    assert gap[1.0] > 0.2 and 0.05 < gap[0.4] < 0.6 * gap[1.0], gap
    assert Appearance().subtle(1.0) == dataclasses.replace(Appearance(), lesion_contrast=1.0)
    with pytest.raises(ConfigError, match="lesion contrast"):
        make_cohort("unused", 2, lesion_contrast=0.0)


def test_sites_stain_differently_and_are_named_in_the_labels(tmp_path: Path) -> None:
    """``sites``: patients from sites A, B, C in turn; site A keeps the reference stains, the others' fitted
    Macenko stain vectors differ (the same site's slides agree)."""
    import csv

    from fullslide.data.stain import fit_macenko
    from fullslide.slides import open_slide
    from fullslide.slides.synth import make_cohort

    labels = make_cohort(tmp_path, 6, signal="focal", size=(768, 768), sites=3, site_shift=0.35, seed=0)
    rows = list(csv.DictReader(open(labels)))
    assert [r["site"] for r in rows] == ["A", "A", "B", "C", "A", "A"]  # patient 0 has two slides
    he = {}
    for r in rows:
        with open_slide(tmp_path / r["path"]) as slide:
            he.setdefault(r["site"], []).append(np.array(fit_macenko(
                slide.read_region((128, 128), 0, (512, 512)).reshape(-1, 3).astype(float))["he"]))
    same = max(np.abs(a - he["A"][0]).max() for a in he["A"])
    assert same < 0.08, same
    for site in ("B", "C"):
        assert np.abs(he[site][0] - he["A"][0]).max() > 3 * same, site
    plain = make_cohort(tmp_path / "plain", 2, signal="focal", size=(512, 512), seed=0)
    assert "site" not in next(csv.DictReader(open(plain)))
