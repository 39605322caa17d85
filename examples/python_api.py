"""The Python API end to end on a small synthetic cohort: synthesize -> tile -> train -> evaluate -> heatmaps ->
predict new slides. Runs on a CPU in about a minute (CI runs it: tests/test_api.py).

    python examples/python_api.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import fullslide as fs


def main(out: Path) -> fs.Run:
    cohort = fs.synth(out / "cohort", slides=12, size=768, lesion_fraction=0.08, seed=1)
    results = fs.tile(cohort, out / "tiles", target_mpp=1.0, tile_px=32)
    print(f"tiled {sum(r.n_tiles for r in results)} tiles from {len(results)} slides")
    run = fs.train({
        "run_dir": str(out / "run"),
        "data": {"cohort": str(cohort), "coords_dir": str(out / "tiles"), "target_mpp": 1.0, "tile_px": 32,
                 "fractions": [0.5, 0.2, 0.3]},
        "encoder": {"name": "tinycnn", "lr": 1e-3},
        "aggregator": {"name": "gma", "lr": 1e-3},
        "train": {"epochs": 2, "tiles_per_slide": 64, "slides_per_step": 2, "device": "cpu", "loader_workers": 0},
        "eval": {"bootstrap": 200},
    }, progress=False)
    print("validation AUC per epoch:", [row.get("val_auc") for row in run.history])
    metrics = run.evaluate("test")
    auc = metrics["auc"]
    print(f"test AUC {auc['value']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]")
    for row in run.predictions("test"):
        print(row["slide_id"], row["label"], row.get("prob_1", row.get("prediction")))
    pngs = run.heatmaps("test")
    print(f"{len(pngs)} heatmaps in {pngs[0].parent}" if pngs else "no heatmaps")
    new = sorted((out / "cohort" / "slides").glob("*.tiff"))[:2]
    for row in run.predict(new, out=out / "predict"):
        print("new slide", row["slide_id"], "->", row.get("prediction"))
    return run


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("api_example_out"))
