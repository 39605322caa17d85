"""``fullslide tile``: outputs, bad inputs (each a one-line error, never stopping the others),
resume, atomic writes, workers, CSV inputs; and ``fullslide info``."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from fullslide.cli import main
from fullslide.errors import SlideError
from fullslide.slides import read_coords, tile_slides
from fullslide.slides.pyramid_writer import write_pyramidal_tiff


def _blank_tiff(path: Path) -> Path:
    """A pyramidal TIFF of bare glass (no tissue), 1024 x 768 at 0.5 mpp."""
    rng = np.random.default_rng(0)
    strips = (np.clip(rng.normal(243, 2, (min(256, 768 - y), 1024, 3)), 0, 255).astype(np.uint8) for y in range(0, 768, 256))
    write_pyramidal_tiff(path, (1024, 768), strips, mpp=0.5)
    return path


def _no_mpp_tiff(path: Path, source: Path) -> Path:
    """A tiled TIFF with the synthetic slide's pixels but no resolution tags."""
    import tifffile

    from fullslide.slides import open_slide

    pixels = open_slide(source).read_region((0, 0), 0, (1024, 1024))
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None)
    return path


def _corrupt_copy(path: Path, source: Path) -> Path:
    """``source`` with the tile data of level 0 overwritten by noise (directories intact)."""
    import tifffile

    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        page = tif.pages[0]
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            data[offset + 20 : offset + count - 2] = bytes(count - 22)
    path.write_bytes(bytes(data))
    return path


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_tile_outputs_clam_trident_layout(real_svs: Path, tmp_path: Path) -> None:
    (result,) = tile_slides([real_svs], tmp_path)
    h5_path = tmp_path / "patches" / "cmu_small_region.h5"
    assert result.h5_path == h5_path and (tmp_path / "thumbnails" / "cmu_small_region.png").is_file()
    with h5py.File(h5_path, "r") as h5:
        coords = h5["coords"]
        assert coords.dtype == np.int64 and coords.shape == (result.n_tiles, 2)
        attrs = dict(coords.attrs)
    assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == 224 and attrs["patch_level"] == 0
    assert list(attrs["downsample"]) == [1.0, 1.0] and list(attrs["level_dim"]) == [2220, 2967]
    assert attrs["name"] == "cmu_small_region" and attrs["backend"] == "openslide"
    assert attrs["target_mpp"] == 0.5 and attrs["slide_mpp"] == pytest.approx(0.499) and attrs["read_px"] == 224
    assert (attrs["level0_width"], attrs["level0_height"]) == (2220, 2967) and len(attrs["fingerprint"]) == 20
    coords_arr, geometry = read_coords(h5_path)
    assert (coords_arr % 224 == 0).all() and coords_arr[:, 0].max() < 2220 and coords_arr[:, 1].max() < 2967
    assert geometry.tile_px == 224
    with open(tmp_path / "tiling_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["slide_id"] == "cmu_small_region" and rows[0]["status"] == "ok" and int(rows[0]["tiles"]) == result.n_tiles
    from PIL import Image

    preview = np.asarray(Image.open(tmp_path / "thumbnails" / "cmu_small_region.png"))
    assert (preview == (0, 170, 0)).all(axis=2).any()  # tissue contour drawn
    assert (preview == (30, 60, 220)).all(axis=2).sum() > 100  # tile outlines drawn


def test_bad_inputs_fail_alone_with_one_line_errors(
    real_svs: Path, synth_slide: Path, rgb_image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    data = synth_slide.read_bytes()
    (bad / "truncated.tiff").write_bytes(data[: len(data) * 2 // 3])
    (bad / "notes.svs").write_text("not a slide\n")
    (bad / "nocols.csv").write_text("file,label\nx.svs,1\n")
    failing = {
        "missing": (bad / "missing.svs", "file not found"),
        "not a slide": (bad / "notes.svs", "not a slide"),
        "truncated": (bad / "truncated.tiff", "truncated or corrupt TIFF"),
        "corrupt": (_corrupt_copy(bad / "corrupt.tiff", synth_slide), "cannot read region"),
        "no mpp": (_no_mpp_tiff(bad / "nompp.tiff", synth_slide), "--mpp"),
        "plain image without mpp": (rgb_image, "--mpp"),
        "csv without path": (bad / "nocols.csv", "no 'path' column"),
    }
    blank = _blank_tiff(bad / "blank.tiff")
    inputs = [str(real_svs)] + [str(p) for p, _ in failing.values()] + [str(blank), str(synth_slide)]
    out = tmp_path / "out"
    code = main(["tile", *inputs, "--out", str(out), "--tile-px", "128", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    errors = [line for line in _lines(captured.err) if ": error: " in line]
    assert len(errors) == len(failing)
    for name, (path, cause) in failing.items():
        (line,) = [e for e in errors if f"error: {path}: " in e]
        assert cause in line, (name, line)
    warnings = [line for line in _lines(captured.err) if ": warning: " in line]
    assert any(str(blank) in w and "no tissue" in w for w in warnings)
    # the good slides were tiled all the same; the blank one gives an empty (not failed) result
    assert (out / "patches" / "cmu_small_region.h5").is_file() and (out / "patches" / "synth_0000.h5").is_file()
    coords, _ = read_coords(out / "patches" / "blank.h5")
    assert coords.shape == (0, 2)
    with open(out / "tiling_summary.csv") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert len(rows) == len(inputs)
    assert {rows[str(p)]["status"] for p, _ in failing.values()} == {"failed"}
    assert rows[str(blank)]["status"] == "empty" and rows[str(real_svs)]["status"] == "ok"
    assert "failed" in captured.out and "7 failed" in captured.out  # summary table lists them


def test_unwritable_output_folder_is_one_line_error(real_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = main(["tile", str(real_svs), "--out", str(blocker / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = _lines(err)
    assert str(blocker / "out") in line and "not writable" in line


def test_resume_skips_done_slides_and_retiles_on_new_parameters(real_svs: Path, synth_slide: Path, tmp_path: Path) -> None:
    first = tile_slides([real_svs, synth_slide], tmp_path, tile_px=128)
    assert [r.status for r in first] == ["ok", "ok"]
    h5 = tmp_path / "patches" / "synth_0000.h5"
    stamp = h5.stat().st_mtime_ns
    second = tile_slides([real_svs, synth_slide], tmp_path, tile_px=128)
    assert [r.status for r in second] == ["skipped", "skipped"]
    assert [r.n_tiles for r in second] == [r.n_tiles for r in first]
    assert h5.stat().st_mtime_ns == stamp
    third = tile_slides([real_svs, synth_slide], tmp_path, tile_px=96)
    assert [r.status for r in third] == ["ok", "ok"]
    assert read_coords(h5)[1].tile_px == 96 and third[1].n_tiles > first[1].n_tiles
    assert tile_slides([synth_slide], tmp_path, tile_px=96, overwrite=True)[0].status == "ok"
    # a damaged output is redone, not trusted
    h5.write_bytes(b"garbage")
    assert tile_slides([synth_slide], tmp_path, tile_px=96)[0].status == "ok"
    assert read_coords(h5)[0].shape[0] == third[1].n_tiles


def test_failed_write_leaves_no_partial_file(real_svs: Path, synth_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = h5py.AttributeManager.__setitem__

    def fail_midway(self, name, value):  # type: ignore[no-untyped-def]
        if name == "name" and value == "synth_0000":  # after the coords dataset and some attributes
            raise OSError(28, "No space left on device (simulated)")
        return original(self, name, value)

    monkeypatch.setattr(h5py.AttributeManager, "__setitem__", fail_midway)
    results = tile_slides([synth_slide, real_svs], tmp_path)
    assert results[0].status == "failed" and "No space left on device" in results[0].message
    assert results[0].message.startswith(str(synth_slide)) and "\n" not in results[0].message
    assert results[1].status == "ok"
    assert sorted(p.name for p in (tmp_path / "patches").iterdir()) == ["cmu_small_region.h5"]
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def test_two_workers_match_one(synth_cohort: Path, real_svs: Path, tmp_path: Path) -> None:
    serial = tile_slides([synth_cohort, real_svs], tmp_path / "one", tile_px=128, workers=1)
    parallel = tile_slides([synth_cohort, real_svs, tmp_path / "missing.svs"], tmp_path / "two", tile_px=128, workers=2)
    assert [r.status for r in parallel] == ["ok"] * 5 + ["failed"]
    for a, b in zip(serial, parallel):
        assert a.slide_id == b.slide_id
        np.testing.assert_array_equal(read_coords(a.h5_path)[0], read_coords(b.h5_path)[0])


def test_csv_inputs_relative_paths_ids_and_mpp(synth_slide: Path, rgb_image: Path, tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    (cohort / "imgs").mkdir(parents=True)
    shutil.copy(synth_slide, cohort / "imgs" / "s.tiff")
    shutil.copy(rgb_image, cohort / "imgs" / "p.png")
    (cohort / "list.csv").write_text(
        "path,slide_id,mpp\nimgs/s.tiff,case_a,\nimgs/p.png,case_b,2.0\nimgs/s.tiff,,\n"
    )
    results = tile_slides([cohort / "list.csv"], tmp_path / "out", tile_px=64)
    by_id = {r.slide_id: r for r in results}
    assert by_id["case_a"].status == "ok" and by_id["case_a"].mpp == 0.5
    assert by_id["case_b"].status == "ok" and by_id["case_b"].mpp == 2.0  # plain image with the CSV's mpp
    assert by_id["s"].status == "ok"  # id from the file stem
    _, geometry = read_coords(tmp_path / "out" / "patches" / "case_b.h5")
    assert geometry.slide_mpp == 2.0 and geometry.read_px == 16  # 64 px at 0.5 mpp from a 2.0 mpp image: upsampled
    assert "coarser than the target" in by_id["case_b"].message
    # folder input: scans for slide suffixes; duplicate ids are errors, not overwrites
    again = tile_slides([cohort / "imgs", cohort / "imgs" / "s.tiff"], tmp_path / "out2", tile_px=64, mpp=0.5)
    assert [r.status for r in again].count("failed") == 1
    (dup,) = [r for r in again if r.failed]
    assert "slide_id 's' is already used" in dup.message


def test_read_coords_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "text.h5").write_text("nope")
    with h5py.File(tmp_path / "empty.h5", "w") as h5:
        h5.create_dataset("other", data=[1])
    with h5py.File(tmp_path / "noattrs.h5", "w") as h5:
        h5.create_dataset("coords", data=np.zeros((3, 2), dtype=np.int64))
    for name, cause in [("missing.h5", "not found"), ("text.h5", "cannot read"), ("empty.h5", "no 'coords'"),
                        ("noattrs.h5", "missing attributes")]:
        with pytest.raises(SlideError) as info:
            read_coords(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and cause in str(info.value)


def test_info_prints_each_slide_and_failures(real_svs: Path, synth_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["info", str(real_svs), str(synth_slide), str(tmp_path / "nope.svs")])
    captured = capsys.readouterr()
    assert code == 1
    assert "vendor: aperio  backend: openslide  mpp: 0.499 (metadata)" in captured.out
    assert "size: 2220 x 2967 px" in captured.out and "levels: 1" in captured.out
    assert "vendor: generic-tiff" in captured.out and "levels: 3" in captured.out
    assert "level 2: 384 x 384  downsample 4  mpp 2" in captured.out
    (line,) = _lines(captured.err)
    assert line == f"fullslide info: error: {tmp_path / 'nope.svs'}: file not found"
    assert main(["info", "--backend", "tiffslide", str(real_svs)]) == 0
    assert "backend: tiffslide" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_tiff_without_resolution_has_no_mpp_on_both_backends(synth_slide: Path, tmp_path: Path, backend: str) -> None:
    from fullslide.slides import open_slide

    path = _no_mpp_tiff(tmp_path / "nompp.tiff", synth_slide)
    slide = open_slide(path, backend=backend)
    assert slide.mpp is None
    with pytest.raises(SlideError, match=r"--mpp"):
        slide.require_mpp()
    assert open_slide(path, backend=backend, mpp=0.5).require_mpp() == 0.5
