"""`fullslide cohort camelyon16|tcga|panda`: cohort CSVs from mocks of each dataset's published layout, holding
tiny synthetic slides (real pyramidal TIFFs), read back by the same code `train` uses."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from fullslide.cli import main
from fullslide.data.cohort import CohortTable
from fullslide.data.datasets import parse_tcga_barcode


@pytest.fixture(scope="module")
def tiny_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fullslide.slides.synth import make_cohort

    csv_path = make_cohort(tmp_path_factory.mktemp("tiny"), 1, size=(512, 512), seed=3)
    return csv_path.parent / "slides" / "synth_0000.tiff"


def _put(slide: Path, *paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(slide, path)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_camelyon16_layout_gives_labels_and_the_official_test_split(tiny_slide: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "CAMELYON16"
    _put(tiny_slide, *[root / "training" / "normal" / f"normal_{i:03d}.tif" for i in range(1, 8)],
         *[root / "training" / "tumor" / f"tumor_{i:03d}.tif" for i in range(1, 6)],
         *[root / "testing" / "images" / f"test_{i:03d}.tif" for i in range(1, 4)])
    (root / "testing" / "reference.csv").write_text("test_001,Tumor,Macro,Tumor\ntest_002,Normal,,\n"
                                                    "test_003,Tumor,Micro,Tumor\n")
    out = tmp_path / "cohorts" / "c16.csv"
    assert main(["cohort", "camelyon16", str(root), "--out", str(out), "--val-fraction", "0.4"]) == 0
    assert "15 slides of 15 patients" in capsys.readouterr().out
    rows = {r["slide_id"]: r for r in _rows(out)}
    assert (rows["test_001"]["label"], rows["test_001"]["split"]) == ("tumor", "test")
    assert (rows["test_002"]["label"], rows["normal_003"]["label"], rows["tumor_005"]["label"]) == \
        ("normal", "normal", "tumor")
    train = [r for r in rows.values() if r["split"] != "test"]
    val = [r for r in train if r["split"] == "val"]
    assert {r["label"] for r in val} == {"normal", "tumor"} and len(val) == round(0.4 * 7) + round(0.4 * 5)
    assert not Path(rows["test_001"]["path"]).is_absolute()  # portable: relative to the CSV
    table = CohortTable.from_csv(out)  # what `train` reads; paths resolve
    assert table.by_id("test_003").path.resolve() == (root / "testing" / "images" / "test_003.tif").resolve()
    # a listed test slide that is missing is an error naming it, unless skipped on request
    (root / "testing" / "images" / "test_002.tif").unlink()
    assert main(["cohort", "camelyon16", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "test_002.tif" in err and "listed in reference.csv" in err and len(err.strip().splitlines()) == 1
    assert main(["cohort", "camelyon16", str(root), "--out", str(out), "--skip-missing"]) == 0
    assert "test_002" not in {r["slide_id"] for r in _rows(out)}


def test_tcga_barcodes_give_patients_and_labels_join_by_patient(tiny_slide: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_tcga_barcode("TCGA-05-4244-01Z-00-DX1.d4ff32cd-38cf-40ea-8213-45c2b100ac01.svs") == {
        "slide_id": "TCGA-05-4244-01Z-00-DX1", "patient_id": "TCGA-05-4244", "sample_type": "01", "section": "DX"}
    assert parse_tcga_barcode("slide_001.svs") is None
    root = tmp_path / "gdc"
    names = ["TCGA-05-4244-01Z-00-DX1.aaaa.svs", "TCGA-05-4244-01Z-00-DX2.bbbb.svs",
             "TCGA-05-4249-01Z-00-DX1.cccc.svs", "TCGA-05-4249-01A-01-TS1.dddd.svs", "TCGA-44-2655-11A-01-DX1.eeee.svs"]
    _put(tiny_slide, *[root / f"uuid-{i}" / n for i, n in enumerate(names)])
    out = tmp_path / "tcga.csv"
    assert main(["cohort", "tcga", str(root), "--out", str(out)]) == 0  # no labels: a slide list for predict/extract
    rows = _rows(out)
    assert [r["slide_id"] for r in rows] == ["TCGA-05-4244-01Z-00-DX1", "TCGA-05-4244-01Z-00-DX2",
                                             "TCGA-05-4249-01Z-00-DX1", "TCGA-44-2655-11A-01-DX1"]  # no frozen TS
    assert [r["patient_id"] for r in rows][:3] == ["TCGA-05-4244", "TCGA-05-4244", "TCGA-05-4249"]
    assert rows[3]["sample_type"] == "11"
    labels = tmp_path / "egfr.tsv"
    labels.write_text("case_submitter_id\tEGFR\nTCGA-05-4244\tmutant\nTCGA-05-4249\twildtype\n")
    assert main(["cohort", "tcga", str(root), "--out", str(out), "--labels", str(labels), "--label-column", "EGFR"]) == 0
    table = CohortTable.from_csv(out)
    assert [(r.slide_id, r.patient_id, r.label) for r in table.records] == [
        ("TCGA-05-4244-01Z-00-DX1", "TCGA-05-4244", "mutant"), ("TCGA-05-4244-01Z-00-DX2", "TCGA-05-4244", "mutant"),
        ("TCGA-05-4249-01Z-00-DX1", "TCGA-05-4249", "wildtype")]  # the unlabelled patient is left out (warned)
    assert main(["cohort", "tcga", str(root), "--out", str(out), "--labels", str(labels), "--label-column", "KRAS"]) == 2
    err = capsys.readouterr().err
    assert "egfr.tsv" in err and "no column 'KRAS'" in err


def test_panda_layout_gives_isup_grades_with_the_provider(tiny_slide: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "panda"
    ids = ["0005f7aaab2800f6170c399693a96917", "000920ad0b612851f8e01bcc880d9b3d", "0018ae58b01bdadc8e347995b69f99aa"]
    _put(tiny_slide, *[root / "train_images" / f"{i}.tiff" for i in ids])
    (root / "train.csv").write_text("image_id,data_provider,isup_grade,gleason_score\n"
                                    f"{ids[0]},karolinska,0,0+0\n{ids[1]},karolinska,0,0+0\n{ids[2]},radboud,4,4+4\n")
    out = tmp_path / "panda.csv"
    assert main(["cohort", "panda", str(root), "--out", str(out)]) == 0
    rows = _rows(out)
    assert [(r["label"], r["provider"], r["gleason_score"]) for r in rows] == [
        ("0", "karolinska", "0+0"), ("0", "karolinska", "0+0"), ("4", "radboud", "4+4")]
    assert CohortTable.from_csv(out).classes == ("0", "4")
    (root / "train.csv").write_text(f"image_id,data_provider,isup_grade\n{ids[0]},radboud,six\n")
    assert main(["cohort", "panda", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "train.csv: line 2, column 'isup_grade'" in err and "six" in err
    assert [(r["label"]) for r in _rows(out)] == ["0", "0", "4"]  # the failed run left the old CSV whole


@pytest.mark.parametrize("name", ["camelyon16_uni", "tcga_luad_egfr_uni", "panda_uni"])
def test_example_configs_load_and_name_a_recipe(name: str) -> None:
    from fullslide.models.recipes import get_recipe
    from fullslide.train.config import load_config

    config = load_config(Path(__file__).parents[1] / "examples" / "configs" / f"{name}.yaml")
    assert get_recipe(config.encoder.name) is not None and config.data.tile_px == 224
    assert config.data.target_mpp == 0.5
