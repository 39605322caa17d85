"""Bad inputs and faults of the issue "Inputs and faults": each gets one line naming the file or key, or a
warning where the run stays meaningful, never a traceback or a run that trains the wrong thing."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from fullslide.cli import main
from fullslide.data.cohort import CohortTable
from fullslide.data.splits import assign_splits
from fullslide.errors import CohortError, ConfigError, FullslideError
from fullslide.slides.coords_io import STORED_DTYPE, coords_problem
from fullslide.slides.grid import TileGeometry
from fullslide.train.config import config_from_dict, load_config


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _last_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


# ---- path traversal --------------------------------------------------------------------------------------
@pytest.mark.parametrize("slide_id", ["../../../x", "/abs/path", "a/b", "..", "a\\b"])
def test_slide_ids_that_would_escape_their_folder_are_refused(tmp_path: Path, real_svs: Path, slide_id: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    cohort = _csv(tmp_path / "c.csv", ["slide_id", "path", "label"], [["ok", str(real_svs), "0"],
                                                                        [slide_id, str(real_svs), "1"]])
    with pytest.raises(CohortError, match=r"c\.csv: row 2 \(line 3\), column 'slide_id': .*"):
        CohortTable.from_csv(cohort)
    # `tile` (and `predict`) read slide ids from a CSV too: one line, nothing written outside --out
    out = tmp_path / "out"
    assert main(["tile", str(cohort), "--out", str(out), "--no-progress"]) == 1
    assert "column 'slide_id'" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists() and not Path("/abs/path.h5").exists()


# ---- configs ---------------------------------------------------------------------------------------------
def test_numeric_strings_are_accepted_for_numeric_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("encoder:\n  lr: 3e-5\ntrain:\n  epochs: '4'\n")  # YAML 1.1 reads 3e-5 as a string
    cfg = load_config(path, ["aggregator.lr=1e-4"])
    assert cfg.encoder.lr == 3e-5 and cfg.aggregator.lr == 1e-4 and cfg.train.epochs == 4
    with pytest.raises(ConfigError, match="config key 'train.epochs': expected int, got '4.5'"):
        config_from_dict({"train": {"epochs": "4.5"}})
    with pytest.raises(ConfigError, match="config key 'encoder.lr'"):
        config_from_dict({"encoder": {"lr": "fast"}})


@pytest.mark.parametrize("case", ["empty", "bad_set", "tile_parallel", "unwritable"])
def test_config_mistakes_are_one_line(tmp_path: Path, real_svs: Path, case: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    cohort = _csv(tmp_path / "c.csv", ["slide_id", "path", "label"], [["a", str(real_svs), "0"]])
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  cohort: {cohort}\nrun_dir: {tmp_path / 'run'}\n")
    args = ["train", str(path), "--no-progress"]
    if case == "empty":
        path.write_text("")
        expected = "the config file is empty"
    elif case == "bad_set":
        args += ["--set", "train.epochs=[1,"]
        expected = "--set 'train.epochs=[1,': the value is not valid YAML"
    elif case == "tile_parallel":
        args += ["--set", "train.tile_parallel=4"]
        expected = "config key 'train.tile_parallel': world_size 1 is not divisible by tile_parallel 4"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        os.chmod(locked, 0o500)
        if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a regular file instead
            (tmp_path / "file").write_text("x")
            locked = tmp_path / "file" / "run"
        args += ["--set", f"run_dir={locked}"]
        expected = f"{locked}: cannot write the run folder"
    assert main(args) == 2
    line = _last_error_line(capsys)
    assert line.startswith("fullslide train: error: ") and expected in line, line


# ---- splits and labels -----------------------------------------------------------------------------------
def _cohort_with_splits(tmp_path: Path, real_svs: Path, labels: list[str], splits: list[str], **extra) -> Path:
    header = ["slide_id", "path", "label", "patient_id", "split"] + list(extra)
    rows = [[f"s{i}", str(real_svs), lab, f"p{i}", sp] + [v[i] for v in extra.values()]
            for i, (lab, sp) in enumerate(zip(labels, splits))]
    return _csv(tmp_path / "c.csv", header, rows)


def test_a_split_column_is_honoured_by_default_and_a_warning_says_when_it_is_not(
        tmp_path: Path, real_svs: Path, caplog: pytest.LogCaptureFixture) -> None:
    splits = ["train", "train", "val", "test", "train", "test"]
    cohort = CohortTable.from_csv(_cohort_with_splits(tmp_path, real_svs, ["0", "1"] * 3, splits))
    with caplog.at_level(logging.INFO):
        got = assign_splits(cohort)
    assert [got[f"s{i}"] for i in range(6)] == splits
    assert "from the 'split' column" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assign_splits(cohort, method="fractions")
    assert "'split' column of" in caplog.text and "is ignored" in caplog.text


def _run_data(tmp_path: Path, real_svs: Path, task: str, labels: list[str], splits: list[str], **extra):
    from fullslide.data.loader import SlideSource
    from fullslide.train.setup import RunData

    cohort = CohortTable.from_csv(_cohort_with_splits(tmp_path, real_svs, labels, splits, **extra), task=task)
    sources = {r.slide_id: SlideSource(r.slide_id, str(r.path), 10) for r in cohort.records}
    return RunData(cohort=cohort, splits={r.slide_id: r.split for r in cohort.records}, sources=sources, excluded={})


def test_a_class_without_training_slides_is_refused(tmp_path: Path, real_svs: Path) -> None:
    from fullslide.train.setup import check_trainable

    data = _run_data(tmp_path, real_svs, "classification", ["0", "1", "0", "2"], ["train", "train", "val", "test"])
    with pytest.raises(FullslideError, match=r"c\.csv: class '2' has no training slide \(only in the test split\)"):
        check_trainable(data, "classification")


def test_one_class_in_validation_warns_and_the_best_checkpoint_falls_back_to_loss(
        tmp_path: Path, real_svs: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fullslide.train.setup import check_trainable

    data = _run_data(tmp_path, real_svs, "classification", ["0", "1", "0", "1"], ["train", "train", "val", "test"])
    with caplog.at_level(logging.WARNING):
        check_trainable(data, "classification")
    assert "validation split holds one class only" in caplog.text


def test_survival_without_events_is_refused(tmp_path: Path, real_svs: Path) -> None:
    from fullslide.train.setup import check_trainable

    cohort = _csv(tmp_path / "c.csv", ["slide_id", "path", "time", "event", "patient_id", "split"],
                  [[f"s{i}", str(real_svs), str(10 + i), "0", f"p{i}", "train"] for i in range(4)])
    table = CohortTable.from_csv(cohort, task="survival")
    from fullslide.data.loader import SlideSource
    from fullslide.train.setup import RunData

    data = RunData(cohort=table, splits={r.slide_id: "train" for r in table.records},
                   sources={r.slide_id: SlideSource(r.slide_id, str(r.path), 10) for r in table.records}, excluded={})
    with pytest.raises(FullslideError, match="no event .* among the 4 training slides"):
        check_trainable(data, "survival")


# ---- coordinates -----------------------------------------------------------------------------------------
_GEOMETRY = TileGeometry(target_mpp=0.5, tile_px=224, slide_mpp=0.25, level=0, level_downsample=1.0, read_px=448,
                         level0_px=448)
_ATTRS = {"level0_width": 10_000, "level0_height": 8_000, "slide_bytes": 12345, STORED_DTYPE: "int64"}
_GOOD = np.array([[0, 0], [448, 896], [9_000, 7_000]])


@pytest.mark.parametrize("case,expected", [
    ("shifted", "outside the slide"),
    ("huge", "outside the slide"),
    ("int64max", "outside the slide"),
    ("uint8", "too narrow"),
    ("rows", "more than a 10000 x 8000 px slide holds"),
    ("smaller_slide", "was 10000 x 8000 px when tiled"),
    ("other_file", "was 12345 when tiled"),
])
def test_untrustworthy_coordinates_are_named(case: str, expected: str) -> None:
    coords, attrs, size, nbytes = _GOOD.copy(), dict(_ATTRS), (10_000, 8_000), 12345
    if case == "shifted":
        coords -= 5000
    elif case == "huge":
        coords[1] = 10**9
    elif case == "int64max":
        coords[2] = np.iinfo(np.int64).max
    elif case == "uint8":
        attrs[STORED_DTYPE] = "uint8"
    elif case == "rows":
        coords = np.zeros((2_000_000, 2), dtype=np.int64)
    elif case == "smaller_slide":
        size = (5_000, 4_000)
    else:
        nbytes = 999
    assert coords_problem(_GOOD, _GEOMETRY, _ATTRS, (10_000, 8_000), 12345) is None
    problem = coords_problem(coords, _GEOMETRY, attrs, size, nbytes)
    assert problem is not None and expected in problem, problem


# ---- slide files -----------------------------------------------------------------------------------------
def test_info_on_a_symlink_loop_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loop = tmp_path / "loop.svs"
    loop.symlink_to(loop.name)
    assert main(["info", str(loop)]) == 1
    line = _last_error_line(capsys)
    assert f"{loop}: cannot open (Too many levels of symbolic links)" in line
