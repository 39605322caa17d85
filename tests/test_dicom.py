"""DICOM whole-slide images: a folder of instances (and one file of it) is a slide, named after the folder.

The DICOM slide is written by the test itself (wsidicomizer converts the synthetic pyramidal TIFF), so the
pixels, size and mpp it must show are known.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fullslide.cli import main
from fullslide.errors import SlideError
from fullslide.slides import open_slide

wsidicomizer = pytest.importorskip("wsidicomizer", reason="test extra: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def dicom_slide(synth_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synth_slide`` converted to DICOM WSI: a folder ``case_17`` of UID-named ``.dcm`` instances."""
    folder = tmp_path_factory.mktemp("dicom") / "lab" / "case_17"
    folder.mkdir(parents=True)
    files = wsidicomizer.WsiDicomizer.convert(synth_slide, folder, tile_size=256, include_label=False,
                                              include_overview=False, include_thumbnail=False, workers=1)
    assert len(files) == 3 and all(Path(f).name.startswith("1.") for f in files)  # UID names, one per level
    return folder


def test_a_dicom_folder_opens_as_the_slide_it_was_converted_from(dicom_slide: Path, synth_slide: Path) -> None:
    with open_slide(dicom_slide) as dcm, open_slide(synth_slide) as tif:
        assert dcm.slide_id == "case_17" and dcm.path == dicom_slide
        assert (dcm.vendor, dcm.backend) == ("dicom", "openslide")
        assert dcm.mpp == pytest.approx(0.5) and dcm.mpp_source == "metadata"  # from PixelSpacing
        assert dcm.level_dimensions == tif.level_dimensions
        a = np.stack([dcm.read_region(xy, 1, (128, 128)) for xy in [(300, 300), (900, 640)]]).astype(float)
        b = np.stack([tif.read_region(xy, 1, (128, 128)) for xy in [(300, 300), (900, 640)]]).astype(float)
        assert np.abs(a - b).mean() < 2.0  # the conversion re-encodes JPEG: close, not identical
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    one_file = sorted(dicom_slide.glob("*.dcm"))[0]  # any instance opens the whole series, named after its folder
    with open_slide(one_file) as dcm:
        assert dcm.slide_id == "case_17" and dcm.level_count == 3


def test_dicom_without_a_suffix_and_folders_without_dicom(dicom_slide: Path, tmp_path: Path) -> None:
    bare = tmp_path / "pacs_export"
    bare.mkdir()
    for i, f in enumerate(sorted(dicom_slide.glob("*.dcm"))):
        shutil.copy(f, bare / f"IM{i:04d}")  # PACS exports often carry no suffix
    with open_slide(bare) as slide:
        assert slide.slide_id == "pacs_export" and slide.dimensions == (1536, 1536)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlideError, match=r"empty: is a folder, not a slide file \(and holds no DICOM instances\)"):
        open_slide(empty)
    with pytest.raises(SlideError, match="a DICOM slide is read by OpenSlide or fastslide, not by the 'tiffslide' backend"):
        open_slide(bare, backend="tiffslide")


def test_info_and_tile_take_the_folder_and_a_folder_of_folders(dicom_slide: Path, synth_slide: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(dicom_slide)]) == 0
    out = capsys.readouterr().out
    assert "vendor: dicom  backend: openslide  mpp: 0.5 (metadata)" in out and "slide id: case_17" in out
    lab = dicom_slide.parent
    shutil.copy(synth_slide, lab / "plain.tiff")
    try:
        assert main(["tile", str(lab), "--out", str(tmp_path / "t"), "--tile-px", "64", "--target-mpp", "1"]) == 0
    finally:
        (lab / "plain.tiff").unlink()
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "t" / "tiling_summary.csv"))}
    assert set(rows) == {"case_17", "plain"}, rows  # one slide per DICOM folder, never per instance
    assert rows["case_17"]["status"] == "ok" and (tmp_path / "t/patches/case_17.h5").is_file()
    n_dcm, n_tif = int(rows["case_17"]["tiles"]), int(rows["plain"]["tiles"])
    assert n_dcm > 0 and abs(n_dcm - n_tif) <= max(2, n_tif // 20)  # same tissue, re-encoded pixels
    capsys.readouterr()
    # tiling again reuses the output: the fingerprint covers the instances, not the folder entry
    assert main(["tile", str(dicom_slide), "--out", str(tmp_path / "t"), "--tile-px", "64", "--target-mpp", "1"]) == 0
    assert list(csv.DictReader(open(tmp_path / "t" / "tiling_summary.csv")))[0]["status"] == "skipped"
    instance = sorted(dicom_slide.glob("*.dcm"))[-1]  # an instance rewritten in place (re-scanned): tile again
    os.utime(instance, ns=(instance.stat().st_atime_ns, instance.stat().st_mtime_ns + 10**9))
    assert main(["tile", str(dicom_slide), "--out", str(tmp_path / "t"), "--tile-px", "64", "--target-mpp", "1"]) == 0
    assert list(csv.DictReader(open(tmp_path / "t" / "tiling_summary.csv")))[0]["status"] == "ok"


def test_train_and_predict_with_a_dicom_folder_in_the_cohort(dicom_slide: Path, synth_cohort: Path,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fullslide.train.config import config_from_dict
    from fullslide.train.trainer import train

    from conftest import write_split_cohort

    rows = list(csv.DictReader(open(synth_cohort, newline="")))
    cohort = write_split_cohort(synth_cohort, tmp_path / "cohort.csv", {0: dicom_slide})  # slide 0 as DICOM, train
    run = train(config_from_dict({
        "run_dir": str(tmp_path / "run"),
        "data": {"cohort": str(cohort), "target_mpp": 2.0, "tile_px": 32, "split_method": "column"},
        "encoder": {"name": "tinycnn"}, "aggregator": {"name": "mean"},
        "train": {"epochs": 1, "tiles_per_slide": 8, "slides_per_step": 2, "loader_workers": 0},
        "eval": {"bootstrap": 0},
    }), progress=False)
    assert (run / "tiles" / "patches" / f"{rows[0]['slide_id']}.h5").is_file()
    assert not json.loads((run / "run.json").read_text()).get("excluded")
    assert main(["predict", str(run), str(dicom_slide), "--out", str(tmp_path / "pred")]) == 0
    (pred,) = list(csv.DictReader(open(tmp_path / "pred/predictions.csv")))
    assert pred["slide_id"] == "case_17" and pred["prediction"] in ("0", "1") and not pred["error"]
