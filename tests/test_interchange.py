"""Coordinates from TRIDENT and CLAM feed `train` and `extract`; an unusable one is one line, never a re-tile."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np

from fullslide.slides import open_slide, read_coords, tile_slides
from fullslide.train.evaluate import extract
from fullslide.train.trainer import train
from test_app import app_config, cohort  # noqa: F401  (the module-scoped cohort fixture)


def _write(path: Path, xy: np.ndarray, attrs: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("coords", data=xy.astype(np.int64))
        for k, v in attrs.items():
            ds.attrs[k] = v


def test_trident_and_clam_coords_feed_train_and_extract(cohort: Path, tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    tile_slides([cohort], ours, target_mpp=1.0, tile_px=32)
    rows = list(csv.DictReader(open(cohort, newline="")))
    foreign = tmp_path / "foreign"
    expected = {}
    kinds: set[str] = set()
    for i, row in enumerate(rows):
        sid = row["slide_id"]
        xy, geometry = read_coords(ours / "patches" / f"{sid}.h5")
        expected[sid] = xy
        with open_slide(row["path"]) as slide:
            downsamples = list(slide.level_downsamples)
        clam_level = next((lv for lv, d in enumerate(downsamples) if abs(d - 2.0) < 1e-6), None)
        if i == 0:  # unusable: neither TRIDENT's nor CLAM's geometry attribute
            _write(foreign / "patches" / f"{sid}.h5", xy, {"patch_size": 32})
        elif i % 2 == 0 and clam_level is not None and geometry.level0_px == 64:  # CLAM: patch_size at patch_level
            _write(foreign / "patches" / f"{sid}.h5", xy, {
                "patch_size": 32, "patch_level": clam_level, "downsample": np.array([2.0, 2.0]),
                "downsampled_level_dim": np.array([512, 512]), "level_dim": np.array([512, 512]), "name": sid})
            kinds.add("clam")
        else:  # TRIDENT layout and attribute names
            _write(foreign / "patches" / f"{sid}_patches.h5", xy, {
                "patch_size": 32, "patch_size_level0": geometry.level0_px, "level0_magnification": 20,
                "target_magnification": 10, "overlap": 0, "name": sid})
            kinds.add("trident")
    assert kinds == {"clam", "trident"}
    cfg = app_config(tmp_path, cohort, data={"coords_dir": str(foreign)}, train={"epochs": 1})
    run = train(cfg, progress=False)
    info = json.loads((run / "run.json").read_text())
    first = rows[0]["slide_id"]
    assert list(info["excluded"]) == [first]
    assert "neither 'patch_size_level0' (TRIDENT) nor 'patch_level' (CLAM)" in info["excluded"][first]
    assert not (run / "tiles" / "patches" / f"{first}.h5").exists()  # not silently re-tiled
    for sid, xy in expected.items():
        if sid == first:
            continue
        got, geometry = read_coords(run / "tiles" / "patches" / f"{sid}.h5")
        assert np.array_equal(got, xy) and geometry.tile_px == 32 and abs(geometry.target_mpp - 1.0) < 0.01
    out, n_ok, n_failed = extract(cfg, out=tmp_path / "feats", progress=False)
    assert n_ok == len(rows) - 1
    with h5py.File(out / "features" / f"{rows[1]['slide_id']}.h5") as h5:  # CLAM/TRIDENT-style feature file
        assert h5["features"].shape[0] == h5["coords"].shape[0] == len(expected[rows[1]["slide_id"]])
