"""Kill-and-resume gives the uninterrupted run's losses; torchrun with tile parallelism gives the single-process ones."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fullslide.train.config import dump_yaml
from test_app import app_config, make_app_cohort

COLUMNS = ("epoch", "train_loss", "val_loss", "val_auc", "skipped_slides")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, real_svs: Path) -> tuple[Path, Path]:
    """A cohort, pre-tiled coords, and the uninterrupted reference run (3 epochs, 3 steps each)."""
    from fullslide.slides import tile_slides

    root = tmp_path_factory.mktemp("resume")
    cohort = make_app_cohort(root, real_svs)
    tile_slides([cohort], root / "tiles", target_mpp=1.0, tile_px=32)
    ref = root / "reference"
    _run(_write_config(root, cohort, ref), [])
    return root, cohort


def _write_config(root: Path, cohort: Path, run_dir: Path, **train: object) -> Path:
    cfg = app_config(root, cohort, run_dir=str(run_dir), data={"coords_dir": str(root / "tiles")},
                     train={"epochs": 3, "slides_per_step": 1, "tiles_per_slide": 48, "loader_workers": 1, **train},
                     encoder={"drop_rate": 0.2},
                     augment={"hed_sigma": 0.05, "hed_bias": 0.05})  # stain jitter replays on resume too
    path = root / f"{run_dir.name}.yaml"
    path.write_text(dump_yaml(cfg))
    return path


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fullslide.cli", *args]


def _run(config: Path, extra: list[str]) -> None:
    proc = subprocess.run(_cmd("train", str(config), "--no-progress", *extra), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _metrics(run: Path) -> list[tuple[str, ...]]:
    return [tuple(r[c] for c in COLUMNS) for r in csv.DictReader(open(run / "metrics.csv"))]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# sigterm and sigint-group are the same code paths as sigterm-group and sigint (cut to keep CI under 15 minutes)
@pytest.mark.parametrize("how", ["sigint", "sigkill", "sigterm-group"])
def test_interrupted_then_resumed_run_matches_uninterrupted(setup: tuple[Path, Path], how: str) -> None:
    """``-group``: the signal goes to the whole process group, loader workers included, as Slurm, ``timeout``
    and a terminal's Ctrl-C deliver it (the run has one loader worker)."""
    root, cohort = setup
    run = root / f"run_{how}"
    config = _write_config(root, cohort, run)
    proc = subprocess.Popen(_cmd("train", str(config), "--no-progress"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(run / "checkpoints" / "last.json", proc)  # epoch 1 is saved; now in epoch 2
    time.sleep(0.3)
    sig = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[how.split("-")[0]]
    if how.endswith("-group"):
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    if how != "sigkill":  # Ctrl-C and Slurm's SIGTERM: finish the step, checkpoint, exit 128 + signal
        assert proc.returncode == 128 + sig, err[-2000:]
        assert "continue with --resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert len(_metrics(run)) < 3  # it really stopped early
    resumed = subprocess.run(_cmd("train", "--resume", str(run), "--no-progress"), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _metrics(run) == _metrics(root / "reference")
    assert not list(run.rglob("*.tmp*"))


def test_torchrun_tile_parallel_matches_single_process(setup: tuple[Path, Path]) -> None:
    """2 ranks sharing every slide (tile_parallel 2), and 2 slide groups of 1 rank, give the reference losses."""
    root, cohort = setup
    ref = _metrics(root / "reference")
    for tp in (2, 1):
        run = root / f"torchrun_tp{tp}"
        # tile_parallel 2: one group, 1 slide per step, as the reference. tile_parallel 1: 2 slide groups of
        # 1 slide each, i.e. 2 slides per step, compared with a single-process run of 2 slides per step.
        config = _write_config(root, cohort, run, tile_parallel=tp, slides_per_step=1)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "fullslide.cli", "train", str(config), "--no-progress"],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = _metrics(run)
        if tp == 2:
            expected = ref
        else:
            two = root / "reference_2slides"
            if not two.exists():
                _run(_write_config(root, cohort, two, slides_per_step=2), [])
            expected = _metrics(two)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g[0] == e[0] and g[4] == e[4]
            for a, b in zip(g[1:4], e[1:4]):
                assert abs(float(a) - float(b)) <= 1e-4 * max(1.0, abs(float(b))), (g, e)


def test_sigterm_to_the_process_group_of_a_torchrun_job_checkpoints_and_resumes_exactly(
        setup: tuple[Path, Path]) -> None:
    """scancel / the Slurm time limit: SIGTERM reaches torchrun, both ranks and their loader workers at once (and
    each rank once more through torchrun). Both ranks finish the step, rank 0 checkpoints, and a resumed
    2-rank run ends with the uninterrupted run's losses."""
    root, cohort = setup
    run = root / "torchrun_sigterm"
    config = _write_config(root, cohort, run, tile_parallel=2, slides_per_step=1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "fullslide.cli", "train"]
    proc = subprocess.Popen([*torchrun, str(config), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    _wait_for(run / "checkpoints" / "last.json", proc)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert "interrupted: checkpoint saved" in err, err[-3000:]
    assert "Traceback" not in err.split("interrupted: checkpoint saved")[0], err[-3000:]
    assert len(_metrics(run)) < 3
    resumed = subprocess.run([*torchrun, "--resume", str(run), "--no-progress"], capture_output=True, text=True,
                             timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, expected = _metrics(run), _metrics(root / "reference")
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g[0] == e[0] and g[4] == e[4]
        for a, b in zip(g[1:4], e[1:4]):
            assert abs(float(a) - float(b)) <= 1e-4 * max(1.0, abs(float(b))), (g, e)


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(setup: tuple[Path, Path]) -> None:
    root, cohort = setup
    run = root / "run_locked"
    config = _write_config(root, cohort, run)
    first = subprocess.Popen(_cmd("train", str(config), "--no-progress"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run / "config.yaml", first)
        second = subprocess.run(_cmd("train", "--resume", str(run), "--no-progress"), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2
        line = second.stderr.strip().splitlines()[-1]
        assert f"{run}: another fullslide run (pid {first.pid} on " in line and "is writing to this folder" in line
    finally:
        first.kill()
        first.communicate()
    # the kernel dropped the killed run's lock: resuming works, and removes what the kill left half-written
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / ".e0009.abc.tmp").mkdir()
    (run / ".metrics.csv.xyz.tmp.csv").write_text("half")
    if (run / "checkpoints" / "last.json").exists():
        _run(config, ["--resume", str(run)])
        assert not list(run.rglob("*.tmp*"))
        assert len(_metrics(run)) == 3
        log = (run / "train.log").read_text()
        assert "started" in log and "resumed" in log and "epoch   3" in log


def test_a_rank_that_dies_under_torchrun_is_named_in_one_line(setup: tuple[Path, Path]) -> None:
    import psutil

    root, cohort = setup
    run = root / "torchrun_killed"
    config = _write_config(root, cohort, run, tile_parallel=2, slides_per_step=1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "fullslide.cli", "train", str(config), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(run / "checkpoints" / "last.json", proc)
    ranks = psutil.Process(proc.pid).children(recursive=False)  # the workers torchrun started (not loader workers)
    rank1 = next(p for p in ranks if p.environ().get("RANK") == "1")
    rank1.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("fullslide train: error: lost")]
    assert lines, err[-3000:]
    assert f"lost rank 1 (pid {rank1.pid} on " in lines[0] and f"train --resume {run}" in lines[0]


def test_tile_parallel_inference_equals_single_process(setup: tuple[Path, Path]) -> None:
    """eval and extract under torchrun with 2 ranks sharing each slide's tiles give the single-process results."""
    import h5py
    import numpy as np

    root, cohort = setup
    run = root / "reference"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "fullslide.cli"]
    single = subprocess.run(_cmd("eval", str(run), "--split", "test", "--out", str(root / "tp_eval_1"),
                                 "--no-progress"), capture_output=True, text=True, timeout=600, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    two = subprocess.run(torchrun + ["eval", str(run), "--split", "test", "--out", str(root / "tp_eval_2"),
                                     "--tile-parallel", "2", "--no-progress"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a = list(csv.DictReader(open(root / "tp_eval_1" / "predictions.csv")))
    b = list(csv.DictReader(open(root / "tp_eval_2" / "predictions.csv")))
    assert [r["slide_id"] for r in a] == [r["slide_id"] for r in b] and len(a) >= 2
    prob = [k for k in a[0] if k.startswith("prob")]
    assert prob and all(abs(float(x[k]) - float(y[k])) < 1e-5 for x, y in zip(a, b) for k in prob)
    config = root / "reference.yaml"
    for tag, cmd in (("1", _cmd("extract", str(config), "--out", str(root / "tp_feat_1"), "--no-progress")),
                     ("2", torchrun + ["extract", str(config), "--out", str(root / "tp_feat_2"), "--tile-parallel",
                                       "2", "--no-progress"])):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, (tag, proc.stderr[-3000:])
    files = sorted((root / "tp_feat_1" / "features").glob("*.h5"))
    assert files
    for f in files:
        with h5py.File(f) as x, h5py.File(root / "tp_feat_2" / "features" / f.name) as y:
            assert np.allclose(x["features"][...], y["features"][...], atol=1e-5)
            assert np.array_equal(x["coords"][...], y["coords"][...])


def test_a_repeated_sigterm_keeps_the_graceful_stop_and_a_second_ctrl_c_aborts() -> None:
    """A process-group SIGTERM reaches a rank twice (directly and through torchrun): the second must not abort
    the checkpoint; a second Ctrl-C is the user asking to abort at once."""
    from fullslide.train.faults import StopFlag, deferred_interrupt

    flag = StopFlag()
    with deferred_interrupt(flag):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert flag.is_set() and flag.signum == signal.SIGTERM
    flag = StopFlag()
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt(flag):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)


@pytest.mark.parametrize("how", ["sigkill"])  # the harder case: a half-written cache file, an older checkpoint
def test_context_cache_run_resumes_exactly(setup: tuple[Path, Path], how: str) -> None:
    """train.context: cache: the cache is part of the state. Stopped by Ctrl-C, or killed (then a half-written cache
    file is left, as a kill in the middle of a write leaves one), the resumed run equals the uninterrupted one."""
    root, cohort = setup
    ref = root / "reference_context"
    if not ref.exists():
        _run(_write_config(root, cohort, ref, context="cache", context_refresh_epochs=2), [])
    run = root / f"context_{how}"
    config = _write_config(root, cohort, run, context="cache", context_refresh_epochs=2)
    proc = subprocess.Popen(_cmd("train", str(config), "--no-progress"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(run / "checkpoints" / "last.json", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGKILL)
    proc.communicate(timeout=300)
    assert len(_metrics(run)) < 3
    if how == "sigkill":
        versions = sorted((run / "context").glob("*.safetensors"))
        (run / "context" / f".{versions[0].name}.x1y2.tmp.safetensors").write_bytes(b"half a file")
    resumed = subprocess.run(_cmd("train", "--resume", str(run), "--no-progress"), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _metrics(run) == _metrics(ref)
    assert not list(run.rglob("*.tmp*"))
    assert [p.name for p in sorted((run / "context").iterdir())] == [p.name for p in sorted((ref / "context").iterdir())]
