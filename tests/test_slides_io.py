"""Slide reading: one Slide type over every backend, identical pixels, mpp, edges, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fullslide.errors import SlideError
from fullslide.slides import Slide, open_slide, plan_tile_geometry
from fullslide.slides.base import SlideBackend
from fullslide.slides.image_backend import ImageBackend


def _tile_coords(slide: Slide, n: int, level0_px: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    w, h = slide.dimensions
    return np.stack([rng.integers(0, w - level0_px, n), rng.integers(0, h - level0_px, n)], axis=1)


def test_real_svs_metadata(real_svs: Path) -> None:
    for backend in ("openslide", "tiffslide"):
        with open_slide(real_svs, backend=backend) as slide:
            assert slide.backend == backend
            assert slide.vendor == "aperio"
            assert slide.mpp == pytest.approx(0.499)
            assert slide.dimensions == (2220, 2967)
            assert slide.level_count == 1 and slide.level_downsamples == (1.0,)
            assert slide.slide_id == "cmu_small_region"


def test_auto_backend_prefers_openslide_and_override_works(real_svs: Path) -> None:
    assert open_slide(real_svs).backend == "openslide"
    assert open_slide(real_svs, backend="tiffslide").backend == "tiffslide"
    with pytest.raises(SlideError, match="unknown backend 'bogus'"):
        open_slide(real_svs, backend="bogus")


def test_backends_read_identical_pixels_on_real_svs(real_svs: Path) -> None:
    a, b = open_slide(real_svs, backend="openslide"), open_slide(real_svs, backend="tiffslide")
    geometry = plan_tile_geometry(a.require_mpp(), a.level_downsamples, 0.5, 224)
    coords = np.concatenate([_tile_coords(a, 12, 224), [[2100, 2900], [-50, -60]]])  # incl. two past the edges
    tiles_a, tiles_b = a.read_tiles(coords, geometry), b.read_tiles(coords, geometry)
    assert tiles_a.shape == (14, 224, 224, 3) and tiles_a.dtype == np.uint8
    np.testing.assert_array_equal(tiles_a, tiles_b)
    assert tiles_a.std() > 10  # real content, not a blank read
    np.testing.assert_array_equal(a.thumbnail(256), b.thumbnail(256))


def test_backends_read_identical_pixels_on_synthetic_pyramid(synth_slide: Path) -> None:
    a, b = open_slide(synth_slide, backend="openslide"), open_slide(synth_slide, backend="tiffslide")
    assert a.level_dimensions == b.level_dimensions and a.level_count >= 3
    for level in range(a.level_count):
        w, h = a.level_dimensions[level]
        np.testing.assert_array_equal(a.read_region((0, 0), level, (w, h)), b.read_region((0, 0), level, (w, h)))
    geometry = plan_tile_geometry(0.5, a.level_downsamples, target_mpp=1.0, tile_px=64)
    assert geometry.level == 1 and not geometry.needs_resize
    coords = _tile_coords(a, 10, geometry.level0_px) // 2 * 2
    np.testing.assert_array_equal(a.read_tiles(coords, geometry), b.read_tiles(coords, geometry))


def test_regions_past_the_edge_are_white_rgb(real_svs: Path) -> None:
    for backend in ("openslide", "tiffslide"):
        slide = open_slide(real_svs, backend=backend)
        region = slide.read_region((2120, 2867), 0, (200, 200))  # 100 px inside, 100 outside each way
        assert region.shape == (200, 200, 3) and region.dtype == np.uint8
        assert (region[100:, :] == 255).all() and (region[:, 100:] == 255).all()
        np.testing.assert_array_equal(region[:100, :100], slide.read_region((2120, 2867), 0, (100, 100)))
        assert (slide.read_region((5000, 5000), 0, (10, 10)) == 255).all()
        assert (slide.read_region((-300, 0), 0, (64, 64)) == 255).all()


def test_read_tiles_resizes_antialiased(real_svs: Path) -> None:
    slide = open_slide(real_svs)
    geometry = plan_tile_geometry(0.499, slide.level_downsamples, target_mpp=1.0, tile_px=112)
    assert geometry.read_px == 224 and geometry.level0_px == 224
    xy = np.array([[800, 1200]])
    tile = slide.read_tiles(xy, geometry)[0]
    full = slide.read_region((800, 1200), 0, (224, 224)).astype(float)
    box_mean = full.reshape(112, 2, 112, 2, 3).mean(axis=(1, 3))
    assert tile.shape == (112, 112, 3)
    # antialiased: close to the 2x2 mean, much closer than nearest-neighbour subsampling is
    assert np.abs(tile - box_mean).mean() < 0.5 * np.abs(full[::2, ::2] - box_mean).mean()


def test_thumbnail_shape_and_content(real_svs: Path, synth_slide: Path) -> None:
    thumb = open_slide(real_svs).thumbnail(300)
    assert thumb.shape == (300, 224, 3) and thumb.dtype == np.uint8
    small = open_slide(synth_slide).thumbnail(96)
    assert small.shape == (96, 96, 3)
    # uses a pyramid level, and agrees with a box-reduced full read
    slide = open_slide(synth_slide)
    full = slide.read_region((0, 0), 0, slide.dimensions).astype(float)
    ref = full.reshape(96, 16, 96, 16, 3).mean(axis=(1, 3))
    assert np.abs(small.astype(float) - ref).mean() < 6


def test_plain_image_needs_user_mpp(rgb_image: Path) -> None:
    slide = open_slide(rgb_image)
    assert slide.backend == "image" and slide.vendor == "png" and slide.mpp is None
    with pytest.raises(SlideError) as info:
        slide.require_mpp()
    message = str(info.value)
    assert message.startswith(str(rgb_image)) and "--mpp" in message and "\n" not in message
    slide = open_slide(rgb_image, mpp=0.5)
    assert slide.mpp == 0.5 and slide.mpp_source == "user"
    assert tuple(slide.read_region((550, 400), 0, (100, 100))[0, 0]) == (200, 110, 180)
    corner = slide.read_region((750, 550), 0, (100, 100))  # 50 px inside the 800 x 600 image each way
    assert (corner[:50, :50] == 245).all() and (corner[50:] == 255).all() and (corner[:, 50:] == 255).all()


def test_rgba_png_is_composited_to_rgb(tmp_path: Path) -> None:
    from PIL import Image

    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[:20] = (255, 0, 0, 255)  # opaque red top, transparent bottom
    Image.fromarray(rgba).save(tmp_path / "a.png")
    region = open_slide(tmp_path / "a.png", mpp=1.0).read_region((0, 0), 0, (40, 40))
    assert region.shape == (40, 40, 3)
    assert tuple(region[0, 0]) == (255, 0, 0) and tuple(region[-1, -1]) == (255, 255, 255)


def test_mpp_override_beats_metadata(real_svs: Path) -> None:
    slide = open_slide(real_svs, mpp=0.25)
    assert slide.mpp == 0.25 and slide.mpp_source == "user"
    with pytest.raises(SlideError, match="mpp must be a positive number"):
        open_slide(real_svs, mpp=-1.0)


def test_slide_accepts_an_injected_fake_backend() -> None:
    class Fake(SlideBackend):
        name = "fake"
        vendor = "fake"
        level_dimensions = ((300, 200), (150, 100))
        level_downsamples = (1.0, 2.0)
        metadata_mpp = 0.5

        def read_region(self, level0_xy, level, size_wh):  # type: ignore[no-untyped-def]
            return np.full((size_wh[1], size_wh[0], 3), 10 * (level + 1), dtype=np.uint8)

    slide = Slide("fake.svs", Fake())
    geometry = plan_tile_geometry(slide.require_mpp(), slide.level_downsamples, target_mpp=1.0, tile_px=32)
    tiles = slide.read_tiles(np.array([[0, 0], [280, 0]]), geometry)
    assert geometry.level == 1 and (tiles[0] == 20).all()
    assert (tiles[1][:, :10] == 20).all() and (tiles[1][:, 10:] == 255).all()  # 150 - 140 = 10 px inside


def test_image_backend_from_array() -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    slide = Slide("mem.png", ImageBackend.from_array(rgb), mpp=1.0)
    np.testing.assert_array_equal(slide.read_region((0, 0), 0, (70, 50)), rgb)


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
def test_bad_files_give_one_line_errors(tmp_path: Path, real_svs: Path, synth_slide: Path, backend: str) -> None:
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (tmp_path / "missing.svs", "file not found")
    (tmp_path / "notes.svs").write_text("just some text, not a slide\n")
    cases["not a slide"] = (tmp_path / "notes.svs", "not a slide" if backend == "auto" else "")
    data = synth_slide.read_bytes()
    (tmp_path / "truncated.tiff").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (tmp_path / "truncated.tiff", "truncated or corrupt TIFF")
    svs = real_svs.read_bytes()
    (tmp_path / "truncated.svs").write_bytes(svs[: len(svs) - 5000])
    cases["truncated svs"] = (tmp_path / "truncated.svs", "truncated or corrupt TIFF")
    (tmp_path / "empty.svs").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.svs", "")
    for name, (path, cause) in cases.items():
        with pytest.raises(SlideError) as info:
            open_slide(path, backend=backend)
        message = str(info.value)
        assert message.startswith(f"{path}: "), name
        assert cause in message and "\n" not in message, (name, message)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_corrupt_tile_data_is_a_read_error(tmp_path: Path, synth_slide: Path, backend: str) -> None:
    import tifffile

    data = bytearray(synth_slide.read_bytes())
    with tifffile.TiffFile(synth_slide) as tif:
        page = tif.pages[0]
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            data[offset + 20 : offset + count - 2] = np.random.default_rng(offset).integers(0, 255, count - 22, dtype=np.uint8).tobytes()
    path = tmp_path / "corrupt.tiff"
    path.write_bytes(bytes(data))
    slide = open_slide(path, backend=backend)  # directories are intact: it opens
    with pytest.raises(SlideError) as info:
        slide.read_region((512, 512), 0, (224, 224))
    assert str(info.value).startswith(f"{path}: cannot read region") and "\n" not in str(info.value)


def test_importing_slides_is_cheap() -> None:
    code = (
        "import sys, fullslide.slides as s; from fullslide.slides import TileGeometry, plan_tile_geometry; "
        "heavy = [m for m in ('torch', 'openslide', 'tiffslide', 'h5py', 'scipy') if m in sys.modules]; "
        "assert not heavy, heavy; s.open_slide; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_thumbnail_of_a_huge_single_level_slide_is_bounded_and_reports_progress(monkeypatch) -> None:
    """Without a pyramid, only every k-th band is decoded (k from the pixel budget) and progress is reported."""
    import fullslide.slides.base as base

    reads: list[tuple[int, int]] = []

    class Flat(SlideBackend):
        name = "fake"
        vendor = "fake"
        level_dimensions = ((4000, 4000),)
        level_downsamples = (1.0,)
        metadata_mpp = 0.25

        def read_region(self, level0_xy, level, size_wh):  # type: ignore[no-untyped-def]
            reads.append((level0_xy[1], size_wh[1]))
            value = 100 + level0_xy[1] // 40  # rows differ, so the output shows which band it came from
            return np.full((size_wh[1], size_wh[0], 3), min(value, 255), dtype=np.uint8)

    monkeypatch.setattr(base, "_BAND_BYTES", 3 * 4000 * 400)  # bands of 400 rows: 10 bands
    monkeypatch.setattr(base, "_THUMBNAIL_READ_PX", 4000 * 4000 // 4)  # budget: a quarter of the pixels
    seen: list[float] = []
    thumb = Slide("flat.tiff", Flat()).thumbnail(400, progress=seen.append)
    assert thumb.shape == (400, 400, 3)
    assert len(reads) == 3 and [y for y, _ in reads] == [0, 1600, 3200]  # 1 band in 4
    assert seen == sorted(seen) and seen[-1] <= 1.0 and len(seen) == 3
    assert (thumb[:160] == thumb[0]).all()  # bands 1-3 repeat band 0


def test_openslide_direct_reader_equals_the_pil_path_also_on_transparent_pixels(real_svs: Path) -> None:
    from fullslide.slides.openslide_backend import OpenSlideBackend

    backend = OpenSlideBackend(real_svs)
    for xy in [(100, 200), (-40, -30)]:  # inside; and half outside the image, where OpenSlide gives alpha 0
        direct = backend._read_direct(xy, 0, (96, 64))
        pil = backend._read_pil(xy, 0, (96, 64))
        assert direct.shape == pil.shape == (64, 96, 3)
        assert np.abs(direct.astype(int) - pil.astype(int)).max() <= 1
    assert (backend._read_direct((-40, -30), 0, (96, 64))[:20, :30] == 255).all()  # outside composites to white
    backend.close()


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("target_mpp,tile_px", [(0.499, 64), (1.0, 32)])  # read as is; read and resized
def test_channels_first_tiles_equal_the_transposed_tiles(real_svs: Path, backend: str, target_mpp: float,
                                                         tile_px: int) -> None:
    with open_slide(real_svs, backend=backend) as slide:
        geometry = plan_tile_geometry(slide.require_mpp(), slide.level_downsamples, target_mpp, tile_px)
        coords = np.array([[0, 0], [500, 700], [1200, 2000], [slide.dimensions[0] - 10, 5]])  # last one overhangs
        hwc = slide.read_tiles(coords, geometry)
        chw = slide.read_tiles(coords, geometry, channels_first=True)
        inside = slide.read_tiles(coords[:3], geometry, channels_first=True)  # the bulk path where it applies
    assert chw.flags["C_CONTIGUOUS"] and np.array_equal(chw, hwc.transpose(0, 3, 1, 2))
    assert np.array_equal(inside, hwc[:3].transpose(0, 3, 1, 2))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_reading_no_tiles_gives_an_empty_batch(real_svs: Path, backend: str) -> None:
    """A tile-parallel rank can hold no tile of a slide: reading an empty list is an empty batch, not an error."""
    with open_slide(real_svs, backend=backend) as slide:
        geometry = plan_tile_geometry(slide.require_mpp(), slide.level_downsamples, 0.499, 64)
        empty = np.zeros((0, 2), dtype=np.int64)
        assert slide.read_tiles(empty, geometry).shape == (0, 64, 64, 3)
        assert slide.read_tiles(empty, geometry, channels_first=True).shape == (0, 3, 64, 64)


def test_fastslide_backend_reads_the_same_regions_as_openslide(real_svs: Path, synth_slide: Path) -> None:
    """fastslide (optional reader, chosen by name) at every level: same geometry and mpp, pixels within JPEG
    decoder differences, and far from a region read 8 px off (so level-0 coordinates are converted right)."""
    pytest.importorskip("fastslide", reason="test extra: pip install -e '.[test]'")
    for path in (real_svs, synth_slide):
        with open_slide(path, backend="fastslide") as fast, open_slide(path, backend="openslide") as ref:
            assert fast.backend == "fastslide" and fast.level_dimensions == ref.level_dimensions
            assert fast.mpp == pytest.approx(ref.mpp)
            for level in range(fast.level_count):
                a = fast.read_region((400, 520), level, (200, 150)).astype(float)
                b = ref.read_region((400, 520), level, (200, 150)).astype(float)
                off = ref.read_region((400 + 8 * round(ref.level_downsamples[level]), 520), level, (200, 150))
                assert np.abs(a - b).mean() < 2.0, (path.name, level)
                assert np.abs(a - b).mean() < 0.5 * np.abs(a - off.astype(float)).mean(), (path.name, level)
