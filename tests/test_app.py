"""The application end to end on tiny synthetic slides and the real SVS: train, eval, predict, heatmap,
extract + frozen baseline, faults (bad slide, NaN loss, OOM message)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from fullslide.cli import main
from fullslide.errors import FullslideError
from fullslide.train.config import config_from_dict, dump_yaml
from fullslide.train.trainer import Trainer, train

TESTS = Path(__file__).parent


def make_app_cohort(root: Path, real_svs: Path) -> Path:
    """10 synthetic slides (7 patients) + the real SVS, with a split column (patients never straddle splits)."""
    from fullslide.slides.synth import make_cohort

    labels = make_cohort(root / "synth", 10, signal="focal", size=(1024, 1024), mpp=0.5, lesion_fraction=0.05, seed=5)
    rows = list(csv.DictReader(open(labels, newline="")))
    patients = list(dict.fromkeys(r["patient_id"] for r in rows))
    split_of = {p: "train" if i < 4 else ("val" if i < 6 else "test") for i, p in enumerate(patients)}
    out = root / "cohort.csv"
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "label", "patient_id", "split"])
        for r in rows:
            w.writerow([r["slide_id"], str(labels.parent / r["path"]), r["label"], r["patient_id"], split_of[r["patient_id"]]])
        test_labels = {r["label"] for r in rows if split_of[r["patient_id"]] == "test"}
        w.writerow(["cmu", str(real_svs), "1" if test_labels == {"0"} else "0", "p_cmu", "test"])
    train_labels = {r["label"] for r in rows if split_of[r["patient_id"]] == "train"}
    assert train_labels == {"0", "1"}, "fixture needs both classes in train"
    return out


def app_config(root: Path, cohort: Path, **sections: dict):
    raw = {
        "run_dir": str(root / "run"),
        "data": {"cohort": str(cohort), "target_mpp": 1.0, "tile_px": 32, "split_method": "column"},
        "encoder": {"name": "tinycnn", "lr": 1e-3},
        "aggregator": {"name": "gma", "lr": 1e-3},
        "train": {"epochs": 2, "tiles_per_slide": 24, "slides_per_step": 2, "chunk_tiles": 16, "loader_workers": 0},
        "eval": {"chunk_tiles": 64, "bootstrap": 50},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, real_svs: Path) -> Path:
    return make_app_cohort(tmp_path_factory.mktemp("app"), real_svs)


@pytest.fixture(scope="module")
def trained(cohort: Path) -> Path:
    return train(app_config(cohort.parent, cohort), progress=False)


def test_train_writes_a_complete_run_folder(trained: Path) -> None:
    from safetensors.torch import load_file

    for name in ("config.yaml", "splits.csv", "metrics.csv", "run.json", "train.log", "checkpoints/last.json",
                 "checkpoints/best.json"):
        assert (trained / name).exists(), name
    rows = list(csv.DictReader(open(trained / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["train_loss"]) > 0 and r["val_loss"] and r["val_auc"] for r in rows)
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
    last = trained / "checkpoints" / json.loads((trained / "checkpoints/last.json").read_text())["checkpoint"]
    weights = load_file(str(last / "model.safetensors"))
    assert any(k.startswith("encoder.") for k in weights) and any(k.startswith("aggregator.") for k in weights)
    state = json.loads((last / "state.json").read_text())
    assert state["epoch"] == 2 and state["next_step"] == 0 and len(state["history"]) == 2
    assert json.loads((trained / "run.json").read_text())["classes"] == ["0", "1"]
    splits = {r["slide_id"]: r["split"] for r in csv.DictReader(open(trained / "splits.csv"))}
    assert splits["cmu"] == "test"
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == 2 and cfg["data"]["tile_px"] == 32
    assert not list(trained.rglob("*.tmp*")), "temporary files left behind"


def test_eval_writes_predictions_and_metrics_with_intervals(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(trained), "--split", "test"]) == 0
    assert "test: loss" in capsys.readouterr().out
    rows = list(csv.DictReader(open(trained / "eval/test/predictions.csv")))
    assert {r["slide_id"] for r in rows} == {"synth_0008", "synth_0009", "cmu"}
    for r in rows:
        assert abs(float(r["prob_0"]) + float(r["prob_1"]) - 1) < 1e-5 and r["label"] in ("0", "1") and not r["error"]
    metrics = json.loads((trained / "eval/test/metrics.json").read_text())["metrics"]
    assert set(metrics["auc"]) >= {"value", "ci_low", "ci_high", "n"} and metrics["auc"]["n"] == 3


def test_predict_new_slides_tiles_them_and_reports_bad_files(trained: Path, real_svs: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide at all")
    synth = trained.parent / "synth" / "slides" / "synth_0000.tiff"
    code = main(["predict", str(trained), str(real_svs), str(synth), str(junk), "--out", str(tmp_path / "pred"),
                 "--heatmaps"])
    assert code == 1  # one slide failed
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "pred/predictions.csv"))}
    assert set(rows) == {"cmu_small_region", "synth_0000", "junk"}
    assert rows["cmu_small_region"]["prediction"] in ("0", "1") and not rows["cmu_small_region"]["error"]
    assert "junk.svs" in rows["junk"]["error"]
    assert (tmp_path / "pred/heatmaps/cmu_small_region_attention.png").exists()
    assert "2 slide(s) predicted, 1 failed" in capsys.readouterr().out


def test_heatmap_png_and_qupath_geojson(trained: Path, tmp_path: Path) -> None:
    from PIL import Image

    from fullslide.slides import read_coords

    assert main(["heatmap", str(trained), "--slides", "cmu", "synth_0008", "--out", str(tmp_path / "hm")]) == 0
    geo = json.loads((tmp_path / "hm/cmu.geojson").read_text())
    coords, geometry = read_coords(trained / "tiles/patches/cmu.h5")
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(coords)
    first = geo["features"][0]
    assert first["properties"]["objectType"] == "tile"
    assert set(first["properties"]["measurements"]) == {"attention", "attention_rank"}
    ring = first["geometry"]["coordinates"][0]
    assert ring[0] == [int(coords[0][0]), int(coords[0][1])] and ring[2][0] - ring[0][0] == geometry.level0_px
    attention = [f["properties"]["measurements"]["attention"] for f in geo["features"]]
    assert abs(sum(attention) - 1) < 1e-4
    with Image.open(tmp_path / "hm/cmu_attention.png") as image:
        assert image.mode in ("RGB", "RGBA") and max(image.size) >= 512
    assert (tmp_path / "hm/cmu_attention_gallery.png").stat().st_size > 5_000  # top/bottom tiles at full resolution
    # paper options: annotation outlines from a QuPath GeoJSON, another scale, smoothing; bad values are one line
    ann = tmp_path / "cmu_annotation.geojson"
    ann.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [[[100, 100], [900, 100], [900, 700], [100, 100]]]}, "properties": {}}]}))
    assert main(["heatmap", str(trained), "--slides", "cmu", "--out", str(tmp_path / "hm2"), "--annotations", str(ann),
                 "--scale", "raw", "--smooth", "1", "--alpha", "0.3", "--top-k", "0"]) == 0
    assert (tmp_path / "hm2/cmu_attention.png").exists() and not (tmp_path / "hm2/cmu_attention_gallery.png").exists()
    assert main(["heatmap", str(trained), "--slides", "cmu", "--out", str(tmp_path / "hm3"), "--alpha", "2"]) == 2
    assert main(["heatmap", str(trained), "--slides", "cmu", "--annotations", str(tmp_path / "none.geojson")]) == 2
    # the title: predicted probability of the positive class, the predicted class, the label, run and epoch
    from fullslide.train.evaluate import heatmap_header
    from fullslide.train.inference import SlidePrediction

    best_epoch = json.loads((trained / "checkpoints" / json.loads((trained / "checkpoints/best.json").read_text())[
        "checkpoint"] / "state.json").read_text())["epoch"]
    header = heatmap_header(trained, "best", {"task": "classification", "classes": ["0", "1"]}, "cmu",
                            SlidePrediction("cmu", np.array([0.0, np.log(3.0)])), "1")
    assert (header.prediction, header.label) == ("P(1) 0.750 -> 1", "1")
    assert header.run == f"{trained.name}, epoch {best_epoch} (best)"


def test_extract_then_frozen_baseline_trains_only_the_aggregator(cohort: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from fullslide.models import create_encoder

    torch.manual_seed(0)
    init = create_encoder("tinycnn")
    save_file({k: v.contiguous() for k, v in init.backbone.state_dict().items()}, str(tmp_path / "init.safetensors"))
    cfg = app_config(tmp_path, cohort, encoder={"weights": str(tmp_path / "init.safetensors"), "freeze": True},
                     data={"features_dir": str(tmp_path / "feats")})
    cfg_path = tmp_path / "frozen.yaml"
    cfg_path.write_text(dump_yaml(cfg))
    assert main(["extract", str(cfg_path)]) == 0
    with h5py.File(tmp_path / "feats/features/synth_0000.h5") as h5:
        feats, coords = h5["features"][:], h5["coords"][:]
    assert feats.shape == (len(coords), 64) and np.isfinite(feats).all()
    with torch.no_grad():  # the stored features are the encoder's on the stored tiles
        from fullslide.slides import open_slide, read_coords

        c, g = read_coords(tmp_path / "feats/tiles/patches/synth_0000.h5")
        with open_slide(cohort.parent / "synth/slides/synth_0000.tiff") as slide:
            tiles = torch.from_numpy(slide.read_tiles(c[:4], g)).permute(0, 3, 1, 2)
        init.eval()
        assert np.allclose(init(tiles).numpy(), feats[:4], atol=1e-5)
    run = train(cfg, progress=False)
    last = run / "checkpoints" / json.loads((run / "checkpoints/last.json").read_text())["checkpoint"]
    weights = load_file(str(last / "model.safetensors"))
    for k, v in init.backbone.state_dict().items():
        assert torch.equal(weights[f"encoder.backbone.{k}"], v)  # frozen: unchanged
    assert main(["eval", str(run), "--split", "val"]) == 0


def _cohort_with(cohort: Path, tmp_path: Path, first_path: Path, first_id: str) -> Path:
    """A copy of ``cohort`` whose first row names another slide file and id."""
    return _with_columns(cohort, tmp_path / "cohort.csv",
                         lambda i, r: {"path": str(first_path), "slide_id": first_id} if i == 0 else {})


def test_a_slide_changed_after_tiling_is_left_out_with_one_line(cohort: Path, tmp_path: Path) -> None:
    from fullslide.slides import tile_slides

    tile_slides([cohort], tmp_path / "tiles", target_mpp=1.0, tile_px=32)
    first = Path(next(csv.DictReader(open(cohort, newline="")))["path"])
    broken = tmp_path / "broken.tiff"
    data = first.read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # truncated after tiling
    (tmp_path / "tiles/patches/synth_0000.h5").rename(tmp_path / "tiles/patches/broken.h5")
    bad = _cohort_with(cohort, tmp_path, broken, "broken")
    run = train(app_config(tmp_path, bad, data={"coords_dir": str(tmp_path / "tiles")}, train={"epochs": 1}),
                progress=False)
    assert "broken" in json.loads((run / "run.json").read_text())["excluded"]
    assert "broken" in (run / "train.log").read_text()


def test_a_slide_that_fails_to_read_during_training_is_skipped_and_counted(
        cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fullslide.data.loader import TileReader
    from fullslide.errors import SlideError

    first = next(csv.DictReader(open(cohort, newline="")))
    real = TileReader.tiles

    def corrupt_first(self, source, indices):  # the slide opens, but its tile data do not decode
        if source.slide_id == first["slide_id"]:
            raise SlideError(source.path, "JPEG tile at level 0 is corrupt")
        return real(self, source, indices)

    monkeypatch.setattr(TileReader, "tiles", corrupt_first)
    run = train(app_config(tmp_path, cohort, train={"epochs": 1, "slides_per_step": 1, "warmup_epochs": 0.0}),
                progress=False)
    row = next(csv.DictReader(open(run / "metrics.csv")))
    assert int(row["skipped_slides"]) == 1 and float(row["train_loss"]) > 0
    assert first["path"] in (run / "train.log").read_text()
    # the step with no readable slide still advances the schedule: the last lr is the planned final one
    assert float(row["lr_aggregator"]) == pytest.approx(1e-3 * 0.01)


def test_non_finite_loss_stops_naming_slides_and_saves_last_good_state(cohort: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    cfg = app_config(tmp_path, cohort, aggregator={"name": "engine_factories:nan_after_first"})
    with pytest.raises(FullslideError, match=r"non-finite loss at epoch 1 step 2 \(slides: synth_\d+, synth_\d+\)"):
        train(cfg, progress=False)
    saved = list((tmp_path / "run/checkpoints").glob("*_lastgood"))
    assert len(saved) == 1 and (saved[0] / "model.safetensors").exists()
    state = json.loads((saved[0] / "state.json").read_text())
    assert state["epoch"] == 0 and state["next_step"] == 1


def test_out_of_memory_is_reported_with_k_and_chunk(cohort: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import fullslide.train.trainer as trainer_module

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer_module, "step", oom)
    with pytest.raises(FullslideError, match="K=24 tiles per slide, chunk_tiles=16, mode=auto: lower"):
        Trainer(app_config(tmp_path, cohort), progress=False).run()


def test_existing_run_is_not_overwritten(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    path = trained.parent / "again.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--no-progress"]) == 2
    assert "holds a run already; continue it with --resume" in capsys.readouterr().err


def test_bad_config_key_is_refused_by_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    assert main(["train", str(path)]) == 2
    assert "unknown config key 'train.epoch'" in capsys.readouterr().err


def _with_columns(cohort: Path, out: Path, fill) -> Path:
    """A copy of ``cohort`` with extra columns computed per row (for survival and regression)."""
    rows = list(csv.DictReader(open(cohort, newline="")))
    for i, r in enumerate(rows):
        r.update(fill(i, r))
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def test_survival_task_trains_with_cox_loss_and_reports_c_index(cohort: Path, tmp_path: Path) -> None:
    surv = _with_columns(cohort, tmp_path / "surv.csv",
                         lambda i, r: {"time": 10.0 + 7 * i % 13 - 3 * int(r["label"]), "event": int(i % 3 != 0)})
    run = train(app_config(tmp_path, surv, data={"task": "survival"}, train={"epochs": 1, "slides_per_step": 3}),
                progress=False)
    assert main(["eval", str(run), "--split", "test"]) == 0
    metrics = json.loads((run / "eval/test/metrics.json").read_text())["metrics"]
    assert "c_index" in metrics and metrics["loss"]["value"] >= 0
    rows = list(csv.DictReader(open(run / "eval/test/predictions.csv")))
    assert {"risk", "time", "event"} <= set(rows[0])


def test_regression_task_reports_mae_and_r2(cohort: Path, tmp_path: Path) -> None:
    reg = _with_columns(cohort, tmp_path / "reg.csv", lambda i, r: {"score": 0.5 * i + float(r["label"])})
    run = train(app_config(tmp_path, reg, data={"task": "regression", "label_column": "score"},
                           train={"epochs": 1}), progress=False)
    assert main(["eval", str(run), "--split", "test"]) == 0
    metrics = json.loads((run / "eval/test/metrics.json").read_text())["metrics"]
    assert {"mae", "r2", "loss"} <= set(metrics) and metrics["mae"]["value"] >= 0


def test_stop_request_mid_epoch_saves_and_resume_replays_the_same_steps(trained: Path, cohort: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import fullslide.train.trainer as trainer_module

    real_step, calls = trainer_module.step, []
    trainer = Trainer(app_config(tmp_path, cohort), progress=False)

    def step_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # Ctrl-C during the 4th step (epoch 2, step 1): acted on before the next one
            trainer.stop.set()
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "step", step_then_ctrl_c)
    with pytest.raises(trainer_module.StopRequested):
        trainer.run()
    run = tmp_path / "run"
    state = json.loads((run / "checkpoints" / json.loads((run / "checkpoints/last.json").read_text())["checkpoint"]
                        / "state.json").read_text())
    assert (state["epoch"], state["next_step"]) == (1, 1)
    monkeypatch.setattr(trainer_module, "step", real_step)
    train(resume=run, progress=False)
    assert (run / "metrics.csv").read_text().splitlines()[0] == (trained / "metrics.csv").read_text().splitlines()[0]
    ours = [r for r in csv.DictReader(open(run / "metrics.csv"))]
    ref = [r for r in csv.DictReader(open(trained / "metrics.csv"))]
    for a, b in zip(ours, ref):
        assert {k: a[k] for k in ("train_loss", "val_loss", "val_auc")} == {k: b[k] for k in ("train_loss", "val_loss", "val_auc")}


def test_auto_chunk_size_and_budget_are_logged_and_kept_for_the_run(cohort: Path, tmp_path: Path) -> None:
    """chunk_tiles: auto is chosen once from a probe and stored in the run state (it is part of the seeding
    contract); the first step logs what auto kept under the budget."""
    config = app_config(tmp_path, cohort, train={"epochs": 1, "chunk_tiles": "auto", "memory_budget": "2MB"})
    run = train(config, progress=False)
    log_text = (run / "train.log").read_text()
    assert re.search(r"chunk_tiles auto: (8|16|32) ", log_text)
    assert re.search(r"auto: keeping the graphs of \d+ chunk\(s\) \(\d+ tiles\), recomputing \d+; predicted peak", log_text)
    last = run / "checkpoints" / json.loads((run / "checkpoints/last.json").read_text())["checkpoint"]
    chosen = json.loads((last / "state.json").read_text())["chunk_tiles"]
    resumed = Trainer(resume=run, progress=False)
    resumed._setup()
    assert resumed.chunk_tiles == chosen


def test_a_run_folder_copied_elsewhere_evaluates_and_predicts_from_any_folder(
        cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Paths in RUN/config.yaml are saved absolute, or relative to the run folder when inside it; inference reads
    the checkpoint, never the initial encoder weights (here deleted after training, as a copied run lacks them)."""
    import shutil

    from safetensors.torch import save_file

    from fullslide.models import create_encoder

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(cohort, work / "cohort.csv")  # its slide paths are absolute
    save_file(create_encoder("tinycnn", tile_px=32).state_dict(), str(work / "init.safetensors"))
    monkeypatch.chdir(work)
    config = app_config(work, cohort, run_dir="runs/r", data={"cohort": "cohort.csv"},
                        encoder={"weights": "init.safetensors"}, train={"epochs": 1})
    config.run_dir = "runs/r"
    run = train(config, progress=False)
    saved = yaml.safe_load((work / "runs/r/config.yaml").read_text())
    assert saved["run_dir"] == str(work / "runs/r") and saved["data"]["cohort"] == str(work / "cohort.csv")
    assert saved["encoder"]["weights"] == str(work / "init.safetensors")
    moved = tmp_path / "archive" / "r_copy"
    shutil.copytree(work / run, moved)
    (work / "init.safetensors").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", str(moved), "--split", "test"]) == 0, capsys.readouterr().err
    assert (moved / "eval" / "test" / "metrics.json").exists()
    synth = cohort.parent / "synth" / "slides" / "synth_0000.tiff"
    assert main(["predict", "../archive/r_copy", str(synth), "--out", "preds"]) == 0, capsys.readouterr().err
    assert (elsewhere / "preds" / "predictions.csv").exists()
    assert main(["heatmap", str(moved), "--split", "test"]) == 0, capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MB file system (tmpfs), as a full scratch disk on a cluster; only where mounting is permitted (root)."""
    import subprocess

    mount = tmp_path / "small_disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs is not permitted here (needs root); the SafetensorError path is "
                    "covered by test_a_full_disk_reported_by_safetensors_is_one_line")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_disk_that_fills_up_during_a_checkpoint_is_one_line_and_leaves_no_partial_file(
        cohort: Path, small_disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = app_config(cohort.parent, cohort, run_dir=str(small_disk / "run"), train={"epochs": 3})
    path = small_disk.parent / "full.yaml"
    path.write_text(dump_yaml(cfg))
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "No space left on device" in err[-1] and "--resume" in err[-1] and "Traceback" not in "\n".join(err)
    assert not list((small_disk / "run").rglob("*.tmp*"))


def test_a_full_disk_reported_by_safetensors_is_one_line(cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """safetensors raises its own error type for a failed write: it must reach the user as the OS error it is."""
    import safetensors
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(app_config(tmp_path, cohort, run_dir=str(tmp_path / "run"), train={"epochs": 1})))
    assert main(["train", str(path), "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.safetensors: No space left on device" in last and "--resume" in last
    assert not list((tmp_path / "run").rglob("*.tmp*"))
