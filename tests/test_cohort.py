"""Cohort CSV reading: targets per task, class order, path resolution, and one test per bad input."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fullslide.data.cohort import CohortTable, SlideRecord, sort_classes
from fullslide.errors import CohortError, ConfigError


def write_csv(folder: Path, text: str, name: str = "cohort.csv", files: bool = True) -> Path:
    """Write ``text`` (dedented lines) as a CSV and, if ``files``, touch every relative path it names."""
    path = folder / name
    path.write_text(text, encoding="utf-8")
    if files:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        header = [h.strip() for h in lines[0].split(",")]
        if "path" in header:
            for ln in lines[1:]:
                cells = ln.split(",")
                if len(cells) > header.index("path") and cells[header.index("path")].strip():
                    target = folder / cells[header.index("path")].strip()
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.touch()
    return path


def test_classification_reads_records_targets_and_patients(tmp_path: Path) -> None:
    csv = write_csv(tmp_path, "slide_id,path,label,patient_id,signal\n"
                              "a,slides/a.svs,pos,p1,focal\n"
                              "b,slides/b.svs,neg,p1,focal\n"
                              "c,slides/c.svs,pos,,focal\n")
    cohort = CohortTable.from_csv(csv)
    assert len(cohort) == 3 and cohort.slide_ids == ["a", "b", "c"]
    assert cohort.classes == ("neg", "pos")
    assert cohort.targets().tolist() == [1, 0, 1] and cohort.targets().dtype == np.int64
    a = cohort.by_id("a")
    assert a.path == (tmp_path / "slides" / "a.svs").resolve() and a.path.exists()
    assert (a.row, a.line, a.label, a.patient_id) == (1, 2, "pos", "p1")
    assert cohort.by_id("c").patient_id == "c"  # empty patient_id: the slide is its own patient
    assert cohort.patients() == {"p1": ["a", "b"], "c": ["c"]}
    assert cohort.labelled


def test_missing_patient_column_makes_each_slide_its_own_patient(tmp_path: Path) -> None:
    csv = write_csv(tmp_path, "slide_id,path,label\nx,x.svs,0\ny,y.svs,1\n")
    cohort = CohortTable.from_csv(csv)
    assert [r.patient_id for r in cohort.records] == ["x", "y"]


def test_absolute_path_kept_and_mpp_and_split_parsed(tmp_path: Path) -> None:
    slide = tmp_path / "abs.svs"
    slide.touch()
    (tmp_path / "sub").mkdir()
    csv = write_csv(tmp_path / "sub", f"slide_id,path,label,split,mpp\ns1,{slide},1,Train,0.25\ns2,{slide},0,,\n",
                    files=False)
    cohort = CohortTable.from_csv(csv)
    assert cohort.by_id("s1").path == slide and cohort.by_id("s1").mpp == 0.25
    assert cohort.by_id("s1").split == "train" and cohort.by_id("s2").split is None and cohort.by_id("s2").mpp is None


def test_subset_keeps_classes_and_order(tmp_path: Path) -> None:
    csv = write_csv(tmp_path, "slide_id,path,label\na,a,0\nb,b,1\nc,c,2\n")
    cohort = CohortTable.from_csv(csv)
    sub = cohort.subset(["c", "a"])
    assert sub.slide_ids == ["c", "a"] and sub.classes == ("0", "1", "2")
    assert sub.targets().tolist() == [2, 0]
    with pytest.raises(CohortError, match=r"cohort\.csv: no slide 'zz' in the cohort"):
        cohort.subset(["a", "zz"])
    with pytest.raises(CohortError, match="more than once"):
        cohort.subset(["a", "a"])


@pytest.mark.parametrize(("labels", "expected"), [
    (["1", "0", "2", "10"], ["0", "1", "2", "10"]),
    (["pos", "neg"], ["neg", "pos"]),
    (["g10", "g2", "g1"], ["g1", "g2", "g10"]),
    (["-1", "0.5", "0"], ["-1", "0", "0.5"]),
    (["1", "neg"], ["1", "neg"]),
])
def test_class_order_is_numeric_aware(labels: list[str], expected: list[str]) -> None:
    assert sort_classes(labels) == expected


def test_same_number_spelled_twice_is_an_error(tmp_path: Path) -> None:
    csv = write_csv(tmp_path, "slide_id,path,label\na,a,1\nb,b,1.0\n")
    with pytest.raises(CohortError, match=r"cohort\.csv: column 'label': labels '1' and '1\.0' are the same number"):
        CohortTable.from_csv(csv)


def test_given_classes_fix_order_and_reject_unknown_labels(tmp_path: Path) -> None:
    csv = write_csv(tmp_path, "slide_id,path,label\na,a,pos\nb,b,neg\n")
    cohort = CohortTable.from_csv(csv, classes=["pos", "neg"])
    assert cohort.classes == ("pos", "neg") and cohort.targets().tolist() == [0, 1]
    with pytest.raises(CohortError, match=r"cohort\.csv: row 1 \(line 2\), column 'label': unknown label 'pos'; "
                                          r"known classes: neg, other"):
        CohortTable.from_csv(csv, classes=["neg", "other"])
    with pytest.raises(ConfigError, match="classes"):
        CohortTable.from_csv(csv, classes=["a", "a"])
    with pytest.raises(ConfigError, match="classes: only applies to classification"):
        CohortTable.from_csv(csv, task="regression", classes=["a"])


def test_survival_and_regression_targets(tmp_path: Path) -> None:
    csv = write_csv(tmp_path, "slide_id,path,time,event,score\na,a,12.5,1,0.3\nb,b,3,0,-1e2\n")
    surv = CohortTable.from_csv(csv, task="survival")
    np.testing.assert_array_equal(surv.targets(), [[12.5, 1.0], [3.0, 0.0]])
    assert surv.classes == () and surv.by_id("a").event == 1 and surv.by_id("a").label is None
    reg = CohortTable.from_csv(csv, task="regression", label_column="score")
    np.testing.assert_array_equal(reg.targets(), [0.3, -100.0])
    assert reg.targets().dtype == np.float64


def test_prediction_cohort_without_labels(tmp_path: Path) -> None:
    csv = write_csv(tmp_path, "slide_id,path\nnew1,n1\nnew2,n2\n")
    cohort = CohortTable.from_csv(csv, classes=["neg", "pos"], require_labels=False)
    assert cohort.classes == ("neg", "pos") and not cohort.labelled
    with pytest.raises(CohortError, match=r"row 1 \(line 2\): slide 'new1' has no classification target"):
        cohort.targets()
    partial = write_csv(tmp_path, "slide_id,path,time,event\na,a,3,1\nb,b,,\n", name="part.csv")
    surv = CohortTable.from_csv(partial, task="survival", require_labels=False)
    assert surv.by_id("b").time is None and surv.by_id("a").time == 3.0
    with pytest.raises(CohortError, match=r"part\.csv: row 2 \(line 3\), column 'time': empty value"):
        CohortTable.from_csv(partial, task="survival")


def test_blank_lines_bom_and_spaces(tmp_path: Path) -> None:
    path = tmp_path / "cohort.csv"
    path.write_bytes("\ufeffslide_id , path ,label\n\na, a ,1\n,,\nb,b,\n".encode())
    (tmp_path / "a").touch()
    (tmp_path / "b").touch()
    with pytest.raises(CohortError, match=r"cohort\.csv: row 2 \(line 5\), column 'label': empty value"):
        CohortTable.from_csv(path)
    assert CohortTable.from_csv(path, require_labels=False).by_id("a").label == "1"


def test_missing_slide_file_is_reported_or_skipped(tmp_path: Path) -> None:
    csv = write_csv(tmp_path, "slide_id,path,label\na,there.svs,0\nb,gone.svs,1\n", files=False)
    (tmp_path / "there.svs").touch()
    with pytest.raises(CohortError, match=r"cohort\.csv: row 2 \(line 3\), column 'path': file not found: .*gone\.svs"):
        CohortTable.from_csv(csv)
    assert len(CohortTable.from_csv(csv, check_paths=False)) == 2


BAD_INPUTS = [
    ("slide_id,label\na,0\n", {}, r"cohort\.csv: missing column\(s\) 'path'; found 'slide_id', 'label'"),
    ("slide_id;path;label\na;a;0\n", {}, r"missing column\(s\) 'slide_id', 'path', 'label'.*comma-separated"),
    ("slide_id,path,time\na,a,1\n", {"task": "survival"}, r"missing column\(s\) 'event'"),
    ("slide_id,path,label\n,a,0\n", {}, r"row 1 \(line 2\), column 'slide_id': empty value"),
    ("slide_id,path,label\na,,0\n", {}, r"row 1 \(line 2\), column 'path': empty value"),
    ("slide_id,path,label\na,a,0\nb,b,\n", {}, r"row 2 \(line 3\), column 'label': empty value"),
    ("slide_id,path,label\na,a,0\nb,b,1\na,c,1\n", {},
     r"row 3 \(line 4\), column 'slide_id': duplicate slide id 'a' \(first at row 1\)"),
    ("slide_id,path,label,split\na,a,0,training\n", {},
     r"row 1 \(line 2\), column 'split': unknown split 'training'; allowed: train, val, test"),
    ("slide_id,path,label,patient_id,split\na,a,0,P,train\nb,b,1,Q,val\nc,c,1,P,test\n", {},
     r"row 3 \(line 4\), column 'split': patient 'P' is in split 'test' here but in 'train' at row 1"),
    ("slide_id,path,time,event\na,a,soon,1\n", {"task": "survival"},
     r"row 1 \(line 2\), column 'time': 'soon' is not a number"),
    ("slide_id,path,time,event\na,a,-2,1\n", {"task": "survival"}, r"row 1 \(line 2\), column 'time': must be >= 0"),
    ("slide_id,path,time,event\na,a,2,1\nb,b,3,2\n", {"task": "survival"},
     r"row 2 \(line 3\), column 'event': must be 0 \(censored\) or 1 \(event\), got '2'"),
    ("slide_id,path,time,event\na,a,2,yes\n", {"task": "survival"},
     r"row 1 \(line 2\), column 'event': 'yes' is not a number"),
    ("slide_id,path,y\na,a,1.5\nb,b,nan\n", {"task": "regression", "label_column": "y"},
     r"row 2 \(line 3\), column 'y': 'nan' is not a finite number"),
    ("slide_id,path,y\na,a,high\n", {"task": "regression", "label_column": "y"},
     r"row 1 \(line 2\), column 'y': 'high' is not a number"),
    ("slide_id,path,label,mpp\na,a,0,-0.5\n", {}, r"row 1 \(line 2\), column 'mpp': must be > 0"),
    ("slide_id,path,label\na,a,0,extra\n", {}, r"row 1 \(line 2\): 4 fields but the header has 3"),
    ("slide_id,path,label,label\na,a,0,1\n", {}, r"line 1: duplicate column\(s\) 'label'"),
    ("slide_id,path,label\n", {}, r"cohort\.csv: no slide rows after the header"),
    ("\n\n", {}, r"cohort\.csv: empty file"),
    ("slide_id,path,time,event\na,a,,1\n", {"task": "survival", "require_labels": False},
     r"row 1 \(line 2\), column 'time': empty value while 'event' is given"),
]


@pytest.mark.parametrize(("text", "kwargs", "message"), BAD_INPUTS)
def test_bad_input_names_file_row_and_column(tmp_path: Path, text: str, kwargs: dict[str, Any], message: str) -> None:
    csv = write_csv(tmp_path, text, files=False)
    with pytest.raises(CohortError, match=message) as info:
        CohortTable.from_csv(csv, check_paths=False, **kwargs)
    assert "\n" not in str(info.value) and str(csv) in str(info.value)


def test_missing_csv_and_bad_encoding_and_bad_task(tmp_path: Path) -> None:
    with pytest.raises(CohortError, match=r"nope\.csv: CSV file not found"):
        CohortTable.from_csv(tmp_path / "nope.csv")
    with pytest.raises(CohortError, match=r"CSV file not found \(it is a folder\)"):
        CohortTable.from_csv(tmp_path)
    bad = tmp_path / "latin.csv"
    bad.write_bytes(b"slide_id,path,label\n\xe9,a,0\n")
    with pytest.raises(CohortError, match=r"latin\.csv: not UTF-8 text"):
        CohortTable.from_csv(bad)
    with pytest.raises(ConfigError, match="task: unknown task 'segmentation'"):
        CohortTable.from_csv(bad, task="segmentation")


def test_direct_construction_rejects_duplicates() -> None:
    rec = SlideRecord("a", Path("a"), "a", label="0")
    with pytest.raises(CohortError, match=re.escape("mem.csv: duplicate slide id 'a'")):
        CohortTable(Path("mem.csv"), "classification", (rec, rec), ("0",))
