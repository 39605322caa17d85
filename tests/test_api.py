"""`import fullslide as fs`: the Python API runs the example script end to end, stays cheap to import, and
keeps `fs.train` a function even once the `fullslide.train` package is loaded."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import fullslide as fs
from fullslide.errors import ConfigError

EXAMPLE = Path(__file__).parents[1] / "examples" / "python_api.py"


def test_import_is_cheap_and_lists_the_api() -> None:
    code = ("import sys, fullslide as fs; assert callable(fs.train) and fs.Run; "
            "heavy = [m for m in ('torch', 'openslide', 'tifffile', 'h5py') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert {"train", "tile", "extract", "plan", "Run", "synth"} <= set(dir(fs))
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        fs.trian  # noqa: B018


def test_train_stays_a_function_after_the_train_package_is_imported() -> None:
    import fullslide.train.config  # binds the subpackage to fullslide.train

    assert callable(fs.train) and fs.train.config is fullslide.train.config
    config = fs.load_config({"data": {"cohort": "c.csv"}}, overrides=["train.epochs=3"])
    assert config.train.epochs == 3 and config.data.cohort == "c.csv"
    assert fs.load_config(config, ["train.epochs=5"]).train.epochs == 5 and config.train.epochs == 3  # a copy
    with pytest.raises(ConfigError, match="train.epochs"):
        fs.load_config({"train": {"epochs": 0}})


def test_the_example_trains_evaluates_draws_heatmaps_and_predicts(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("python_api_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = module.main(tmp_path)
    assert isinstance(run, fs.Run) and run.info["classes"] == ["0", "1"]
    assert len(run.history) == 2 and run.config.train.epochs == 2
    metrics = run.evaluate("test")
    assert 0 <= metrics["auc"]["ci_low"] <= metrics["auc"]["value"] <= metrics["auc"]["ci_high"] <= 1
    preds = run.predictions("test")
    assert preds and {p["slide_id"] for p in preds} <= {f"synth_{i:04d}" for i in range(12)}
    assert len(list((tmp_path / "run" / "heatmaps").glob("*_attention.png"))) == len(preds)
    assert [p.name for p in run.heatmaps("test")] == sorted(f"{p['slide_id']}_attention.png" for p in preds)
    assert [r["slide_id"] for r in run.predict([tmp_path / "cohort" / "slides" / "synth_0000.tiff"],
                                               out=tmp_path / "p2")] == ["synth_0000"]
    model = run.model()
    assert not model.training
    # resume through the API: a finished run resumes to the same place
    assert fs.train(resume=run, progress=False).path == run.path
    with pytest.raises(ConfigError, match="not a run folder"):
        fs.Run(tmp_path / "cohort")
