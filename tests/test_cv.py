"""`fullslide cv`: patient-level folds, one resumable run per fold and seed, a results table with intervals, and
ROC/PR curves (pooled and per fold); `eval` writes curve data and PNGs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from fullslide.cli import main


@pytest.fixture(scope="module")
def cv_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from fullslide.slides import tile_slides
    from fullslide.slides.synth import make_cohort

    root = tmp_path_factory.mktemp("cv")
    cohort = make_cohort(root / "cohort", 12, size=(768, 768), lesion_fraction=0.1, seed=5)
    tile_slides([cohort], root / "tiles", target_mpp=1.0, tile_px=32)
    config = root / "cv.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"cohort": str(cohort), "coords_dir": str(root / "tiles"), "target_mpp": 1.0, "tile_px": 32},
        "encoder": {"name": "tinycnn", "lr": 1e-3}, "aggregator": {"name": "gma", "lr": 1e-3},
        "train": {"epochs": 1, "tiles_per_slide": 16, "slides_per_step": 2, "loader_workers": 0, "device": "cpu"},
        "eval": {"bootstrap": 50}}))
    return config, cohort


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_cv_runs_every_fold_once_writes_tables_and_curves_and_resumes(cv_setup: tuple[Path, Path], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    config, cohort = cv_setup
    out = tmp_path / "cv"
    args = ["cv", str(config), "--folds", "3", "--out", str(out)]
    assert main(args) == 0
    assert str(out / "results.md") in capsys.readouterr().out
    patients = {r["slide_id"]: r["patient_id"] for r in _csv(cohort)}
    test_patients = []
    for fold in range(3):
        run = out / "runs" / f"fold{fold}_seed0" / "run"
        splits = {r["slide_id"]: r["split"] for r in _csv(run / "splits.csv")}
        test_patients.append({patients[s] for s, v in splits.items() if v == "test"})
        assert {"train", "val", "test"} == set(splits.values())
        assert (run / "eval" / "val" / "metrics.json").exists() and (run / "eval" / "test" / "roc.png").exists()
    # folds partition the patients: every patient is tested exactly once
    assert sum(len(p) for p in test_patients) == len(set(patients.values())) == len(set().union(*test_patients))
    rows = _csv(out / "results.csv")
    per_run = [r for r in rows if r["fold"] != "mean"]
    assert {(r["fold"], r["split"]) for r in per_run} == {(str(f), s) for f in range(3) for s in ("test", "val")}
    auc_mean = next(r for r in rows if r["fold"] == "mean" and r["split"] == "test" and r["metric"] == "auc")
    aucs = [float(r["value"]) for r in per_run if r["split"] == "test" and r["metric"] == "auc" and r["value"]]
    assert float(auc_mean["value"]) == pytest.approx(sum(aucs) / len(aucs), abs=1e-5)
    assert 0 <= float(auc_mean["ci_low"]) <= float(auc_mean["value"]) <= float(auc_mean["ci_high"]) <= 1
    md = (out / "results.md").read_text()
    assert "| **mean** |" in md and "## Validation" in md and "![ROC](curves/roc.png)" in md
    roc = _csv(out / "curves" / "roc.csv")
    assert {r["group"] for r in roc} == {"pooled", "fold 0", "fold 1", "fold 2"}
    assert (out / "curves" / "roc.png").stat().st_size > 10_000 and (out / "curves" / "pr.png").exists()
    # resume: finished runs are kept; a lost result is redone, and only that one
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    (out / "runs" / "fold1_seed0" / "result.json").unlink()
    assert main(args) == 0
    assert (out / "runs" / "fold0_seed0" / "result.json").stat().st_mtime_ns == stamps[out / "runs" / "fold0_seed0" / "result.json"]
    assert (out / "runs" / "fold1_seed0" / "result.json").exists()
    assert main(["cv", str(config), "--folds", "4", "--out", str(out)]) == 2  # other settings, same folder
    assert "other settings" in capsys.readouterr().err


def test_mean_ci_is_the_t_interval_clipped_to_the_metric_range() -> None:
    from fullslide.experiments.cv import mean_ci

    values = [0.7, 0.8, 0.9]
    mean, low, high = mean_ci(values, "loss")
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) x s.d. / sqrt(n), from the tables
    assert (mean, low, high) == pytest.approx((0.8, 0.8 - half, 0.8 + half))
    assert mean_ci([0.9, 1.0, 1.0], "auc")[2] == 1.0 and mean_ci([0.02, 0.5, 0.03], "loss")[1] == 0.0
    assert mean_ci([0.4], "auc") == (0.4, 0.4, 0.4)


def test_eval_writes_roc_and_pr_curves_that_agree_with_its_auc(cv_setup: tuple[Path, Path], tmp_path: Path) -> None:
    from fullslide.api import train

    config, _ = cv_setup
    run = train(config, overrides=[f"run_dir={tmp_path / 'run'}", "data.fractions=[0.4,0.2,0.4]"], progress=False)
    metrics = run.evaluate("test")
    folder = run.path / "eval" / "test"
    roc = [r for r in _csv(folder / "roc.csv")]
    fpr, tpr = np.array([float(r["fpr"]) for r in roc]), np.array([float(r["tpr"]) for r in roc])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and np.all(np.diff(fpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids under the written curve
    assert area == pytest.approx(metrics["auc"]["value"], abs=1e-6)
    pr = _csv(folder / "pr.csv")
    assert all(0 <= float(r["precision"]) <= 1 and 0 <= float(r["recall"]) <= 1 for r in pr)
    assert (folder / "roc.png").exists() and (folder / "pr.png").exists()
    assert json.loads((folder / "metrics.json").read_text())["metrics"]["auc"]["value"] == metrics["auc"]["value"]
