"""The last bad inputs a real lab and a real cluster produce (issue "Cluster-grade runs"): each is one line naming
the file or key, or is refused before it can train the wrong thing."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fullslide.cli import main
from fullslide.data.cohort import CohortTable
from fullslide.errors import CohortError, ConfigError
from fullslide.slides import read_coords, tile_slides
from fullslide.slides.inputs import collect_jobs
from fullslide.train.config import config_from_dict, dump_yaml
from test_app import app_config, cohort  # noqa: F401  (the module-scoped cohort fixture)
from test_inputs_faults import _csv, _last_error_line as _one_line


@pytest.mark.parametrize("slide_id,label,expected", [
    ("x" * 300, "0", "300 bytes long"),
    (" -x ", "0", "leading or trailing spaces"),
    ("ok", "NA", "'NA' means a missing label"),
    ("ok", "nan", "'nan' means a missing label"),
])
def test_unusable_ids_and_missing_labels_are_refused_with_the_row(tmp_path: Path, real_svs: Path, slide_id: str,
                                                                 label: str, expected: str) -> None:
    path = _csv(tmp_path / "c.csv", ["slide_id", "path", "label"], [["a", str(real_svs), "0"],
                                                                    [slide_id, str(real_svs), label]])
    with pytest.raises(CohortError, match=r"c\.csv: row 2 \(line 3\), column '(slide_id|label)': .*" + expected):
        CohortTable.from_csv(path)


def test_a_slide_file_whose_name_is_no_id_is_refused_and_the_folder_goes_on(tmp_path: Path, real_svs: Path) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "..tiff").write_bytes(real_svs.read_bytes())
    (folder / "good.svs").write_bytes(real_svs.read_bytes())
    jobs, errors = collect_jobs([folder])
    assert [j.slide_id for j in jobs] == ["good"]
    assert len(errors) == 1 and "..tiff" in errors[0].message and "slide id" in errors[0].message


@pytest.mark.parametrize("key,value,expected", [
    ("aggregator.lr", -1, "must be in (0, 1]"), ("encoder.lr", 1e38, "must be in [0, 1]"),
    ("eval.bootstrap", -5, "must be >= 0"), ("train.grad_clip", 0, "must be > 0 or null"),
])
def test_out_of_range_optimiser_and_evaluation_values_are_refused(key: str, value: float, expected: str) -> None:
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"config key '{key}' " + expected.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        config_from_dict({section: {name: value}})


def _config_file(tmp_path: Path, cohort_csv: Path, **sections) -> Path:  # noqa: F811
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(app_config(tmp_path, cohort_csv, **sections)))
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal only happens without it")
def test_cuda_asked_for_without_cuda_is_one_line(tmp_path: Path, cohort: Path,  # noqa: F811
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(_config_file(tmp_path, cohort)), "--set", "train.device=cuda", "--no-progress"]) == 2
    assert "train.device: 'cuda' was asked for" in _one_line(capsys)


def test_a_coords_folder_that_does_not_exist_is_refused_not_retiled(tmp_path: Path, cohort: Path,  # noqa: F811
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = _config_file(tmp_path, cohort, data={"coords_dir": str(tmp_path / "typo")})
    assert main(["train", str(path), "--no-progress"]) == 2
    line = _one_line(capsys)
    assert "data.coords_dir:" in line and "is not a folder" in line
    assert not (tmp_path / "run" / "tiles" / "patches").exists()


def test_extract_into_an_existing_file_is_one_line(tmp_path: Path, cohort: Path,  # noqa: F811
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "features.txt"
    target.write_text("mine")
    assert main(["extract", str(_config_file(tmp_path, cohort)), "--out", str(target)]) == 2
    assert "exists and is not a folder" in _one_line(capsys) and target.read_text() == "mine"


def test_resume_refuses_a_change_of_the_steps_and_names_what_it_allows(tmp_path: Path, cohort: Path,  # noqa: F811
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(app_config(tmp_path, cohort)))
    assert main(["train", "--resume", str(run), "--set", "train.tiles_per_slide=8", "--no-progress"]) == 2
    line = _one_line(capsys)
    assert "--set train.tiles_per_slide with --resume" in line and "train.loader_workers" in line


@pytest.mark.parametrize("size", ["80G", "80GiB", "80GB"])
def test_plan_takes_the_usual_spellings_of_a_gpu_size(size: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--device-memory", size, "--set", "encoder.name=tinycnn", "--set", "data.tile_px=32"]) == 0
    budget = 0.8 * (80 * 2**30 if size != "80GB" else 80e9) / 2**30
    assert f"budget {budget:.2f} GiB" in capsys.readouterr().out


def test_the_split_source_reaches_train_log(tmp_path: Path, cohort: Path) -> None:  # noqa: F811
    from fullslide.train.trainer import train

    run = train(app_config(tmp_path, cohort, data={"split_method": "auto"}, train={"epochs": 1}), progress=False)
    assert "splits: from the 'split' column" in (run / "train.log").read_text()
    logging.getLogger("fullslide").handlers.clear()


def test_clam_coords_at_another_mpp_name_the_users_file(tmp_path: Path, cohort: Path,  # noqa: F811
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    rows = list(csv.DictReader(open(cohort, newline="")))
    ours = tmp_path / "ours"
    tile_slides([cohort], ours, target_mpp=1.0, tile_px=32)
    clam = tmp_path / "clam" / "patches"
    clam.mkdir(parents=True)
    for row in rows:  # CLAM layout: 32 px patches at level 0 (0.5 mpp), while the config asks for 1.0 mpp
        xy, _ = read_coords(ours / "patches" / f"{row['slide_id']}.h5")
        with h5py.File(clam / f"{row['slide_id']}.h5", "w") as h5:
            ds = h5.create_dataset("coords", data=xy.astype(np.int64))
            ds.attrs.update({"patch_size": 32, "patch_level": 0, "downsample": np.array([1.0, 1.0]),
                             "name": row["slide_id"]})
    path = _config_file(tmp_path, cohort, data={"coords_dir": str(tmp_path / "clam")})
    assert main(["train", str(path), "--no-progress"]) == 2
    line = _one_line(capsys)
    assert str(clam) in line and "/run/tiles/" not in line and "data.target_mpp" in line


def test_sigterm_outside_training_stops_the_command_with_143_and_gives_the_handler_back() -> None:
    """An experiment or cv killed between runs or while it evaluates (not inside `train`'s deferred handler) exits
    143, resumable, instead of dying with the default action (which leaves no exit code to act on)."""
    import os
    import signal
    import time

    from fullslide.train.faults import StopRequested, sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StopRequested) as stopped:
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert stopped.value.signum == signal.SIGTERM and 128 + stopped.value.signum == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_signal_while_loader_workers_start_neither_kills_them_nor_is_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slurm signals the whole process group; at the start of an epoch the loader's workers may not yet ignore
    it (torch installs a SIGTERM handler that kills a worker before ``worker_init_fn`` runs). The workers start with
    the stop signals blocked: the read goes on, and the main process still receives the signal."""
    import os
    import signal
    import time

    import fullslide.data.loader as loader_mod

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> int:
            return i

    real = loader_mod.ignore_stop_signals

    def slow_start(worker_id: int) -> None:
        time.sleep(1.5)  # the signal arrives while the worker is still starting
        real(worker_id)

    monkeypatch.setattr(loader_mod, "ignore_stop_signals", slow_start)
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        it = iter(loader_mod.make_loader(Items(), workers=2))
        time.sleep(0.3)
        for worker in it._workers:  # as `kill -TERM -PGID` reaches every process of the group
            os.kill(worker.pid, signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert list(it) == list(range(8))
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
