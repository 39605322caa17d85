"""`fullslide pretrain` and `fullslide experiment ...`: the contrastive loss, pretraining, and the experiments'
plumbing, schema and resume on their `--quick` settings (the science is in EXPERIMENTS.md, not here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fullslide.cli import main
from fullslide.errors import ConfigError


def _reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR's loss written out anchor by anchor from the paper's definition (no fullslide code)."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i]
        total += -math.log(math.exp(float(z[i] @ z[positive]) / t) / sum(others))
    return total / (2 * n)


def test_nt_xent_matches_the_definition() -> None:
    from fullslide.train.pretrain import nt_xent

    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    assert nt_xent(z1, z2, 0.3).item() == pytest.approx(_reference_nt_xent(z1, z2, 0.3), rel=1e-5)
    aligned = nt_xent(z1, z1 + 1e-3 * z2, 0.3).item()  # views that agree: lower loss
    assert aligned < nt_xent(z1, z2, 0.3).item()


def test_views_are_random_in_range_and_replayable() -> None:
    from fullslide.train.pretrain import make_views

    colours = torch.tensor([[230, 40, 40], [40, 230, 40], [40, 40, 230], [200, 200, 60], [60, 200, 200], [120, 120, 120]])
    ramp = torch.linspace(-20, 20, 16)
    tiles = (colours[:, :, None, None] + ramp[None, None, :, None]).clamp(0, 255).to(torch.uint8).expand(-1, -1, -1, 16)
    a = make_views(tiles, torch.Generator().manual_seed(5))
    b = make_views(tiles, torch.Generator().manual_seed(5))
    c = make_views(tiles, torch.Generator().manual_seed(6))
    assert a.shape == (6, 3, 16, 16) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # a view keeps its own tile's content: closer to its tile than to the other tiles
    flat, src = a.flatten(1), (tiles.float() / 255).flatten(1)
    distance = torch.cdist(flat, src)  # [6, 6]
    assert torch.equal(distance.argmin(dim=1), torch.arange(6))


@pytest.fixture(scope="module")
def tiled(synth_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fullslide.slides import tile_slides

    out = tmp_path_factory.mktemp("pretrain_tiles")
    tile_slides([synth_cohort], out, target_mpp=1.0, tile_px=32)
    return out


def test_pretrain_learns_is_deterministic_and_loads_as_encoder_weights(tiled: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from fullslide.models import create_encoder
    from fullslide.train.pretrain import read_pretrain_record

    args = ["pretrain", str(tiled), "--epochs", "4", "--tiles-per-slide", "96", "--batch", "64", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a.safetensors")]) == 0
    assert "contrastive loss" in capsys.readouterr().out
    record = read_pretrain_record(tmp_path / "a.safetensors")
    assert record is not None and record["slides"] == 4 and record["tiles"] == 4 * 96
    assert record["loss_by_epoch"][-1] < record["loss_by_epoch"][0] - 0.1  # it learns
    assert main([*args, "--out", str(tmp_path / "b.safetensors")]) == 0
    a, b = (load_file(str(tmp_path / f"{n}.safetensors")) for n in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights
    pretrained = create_encoder("tinycnn", weights=str(tmp_path / "a.safetensors"))  # strict by default
    torch.manual_seed(0)
    fresh = create_encoder("tinycnn")
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert not torch.allclose(pretrained(x), fresh(x), atol=1e-3)
    assert list(tmp_path.glob("*.tmp*")) == []


def test_pretrain_refuses_a_folder_without_tiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", str(tmp_path), "--out", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no coords files" in err and str(tmp_path) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w.safetensors").exists()


def _check_schema(results: dict, experiment: str) -> None:
    assert results["experiment"] == experiment and results["runs"]
    for run in results["runs"]:
        assert isinstance(run["seed"], int)
        assert isinstance(run["test_auc"], float) and 0 <= run["test_auc"] <= 1
        assert isinstance(run["test_loss"], float) and run["test_loss"] > 0
        if experiment == "k-sweep":
            assert run["k"] == "all" or (isinstance(run["k"], int) and run["k"] > 0)
            assert run["context"] in ("none", "cache")
            assert isinstance(run["final_train_loss"], float)
            assert run["final_train_loss"] == run["train_loss_by_epoch"][-1]
            assert len(run["train_loss_by_epoch"]) == len(run["val_auc_by_epoch"]) == 2  # quick: 2 epochs
            assert isinstance(run["tiles_seen"], int) and isinstance(run["seconds"], float)
        else:
            assert run["model"] in ("frozen", "e2e", "e2e-cache", "e2e-lastN", "e2e-lora")
            assert run["signal"] in ("focal", "diffuse") and run["encoder"] in ("out-of-domain", "in-domain")
            assert run["arch"] in ("cnn", "vit") and isinstance(run["best_epoch"], int)


def test_k_sweep_quick_writes_schema_report_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ks"
    args = ["experiment", "k-sweep", "--out", str(out), "--quick", "--seeds", "1", "--ks", "8,all", "--context", "none,cache"]
    assert main(args) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    _check_schema(results, "k-sweep")
    assert [(r["k"], r["context"]) for r in results["runs"]] == [(8, "none"), (8, "cache"), ("all", "none")]
    small, cached, everything = results["runs"]
    assert cached["tiles_seen"] == small["tiles_seen"]  # the cache arm encodes the same K tiles per step
    assert (out / "runs" / "k8_cache_seed0" / "run" / "context").is_dir()
    assert "| 8 +cache |" in (out / "report.md").read_text() and "K=8 +cache: test AUC" in (out / "report.md").read_text()
    assert small["tiles_seen"] < everything["tiles_seen"]  # same steps, more tiles per step
    report = (out / "report.md").read_text()
    assert "![k-sweep](k_sweep.png)" in report and (out / "k_sweep.png").stat().st_size > 10_000
    assert "| 8 |" in report and "| all |" in report
    # resume: finished runs are kept; a lost result is redone, and only that one
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    (out / "runs" / "kall_seed0" / "result.json").unlink()
    assert main(args) == 0
    assert (out / "runs" / "k8_seed0" / "result.json").stat().st_mtime_ns == stamps[out / "runs" / "k8_seed0" / "result.json"]
    again = json.loads((out / "results.json").read_text())
    assert again["runs"][0] == small
    assert again["runs"][2]["final_train_loss"] == pytest.approx(everything["final_train_loss"], abs=1e-6)  # same seed


def test_e2e_vs_frozen_quick_schema_report_tuning_and_probes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ef"
    assert main(["experiment", "e2e-vs-frozen", "--out", str(out), "--quick", "--seeds", "1", "--seed-offset", "3",
                 "--signals", "focal", "--situations", "out-of-domain", "--tune-lr", "1e-4,1e-3"]) == 0
    results = json.loads((out / "results.json").read_text())
    _check_schema(results, "e2e-vs-frozen")
    assert [(r["encoder"], r["arch"], r["model"], r["seed"]) for r in results["runs"]] == [
        ("out-of-domain", "cnn", m, 3) for m in ("frozen", "e2e", "e2e-cache")]
    report = (out / "report.md").read_text()
    assert "## Verdicts" in report and "| out-of-domain | cnn | focal | e2e-cache |" in report
    assert (out / "e2e_vs_frozen.png").stat().st_size > 10_000 and (out / "probe.png").stat().st_size > 10_000
    # fair arms: the same pretrained weights, the same tiles per step for frozen and e2e; the cache arm reads all
    configs = {m: yaml.safe_load((out / "runs" / f"out-of-domain_cnn_focal_{m}_seed3" / "run" / "config.yaml")
                                 .read_text()) for m in ("frozen", "e2e", "e2e-cache")}
    assert len({c["encoder"]["weights"] for c in configs.values()}) == 1
    assert [c["encoder"]["freeze"] for c in configs.values()] == [True, False, False]
    assert configs["frozen"]["train"]["tiles_per_slide"] == configs["e2e"]["train"]["tiles_per_slide"] == "all"
    assert configs["e2e-cache"]["train"]["context"] == "cache" and configs["e2e-cache"]["train"]["tiles_per_slide"] == 16
    # the out-of-domain encoder was pretrained on slides without any lesion
    pretrain_csv = out / "workspace" / "pretrain_cohort_no_lesions" / "cohort" / "labels.csv"
    assert "lesions/" not in pretrain_csv.read_text() and ",1," not in pretrain_csv.read_text()
    # learning rates chosen on validation runs of the tuning seed, then used by every reported run
    tuning = json.loads((out / "tuning.json").read_text())
    assert {t["seed"] for t in [tuning]} == {100} and len(tuning["trials"]) == 3 * 2
    chosen = {arm: (enc, agg) for arm, enc, agg in tuning["chosen"]}
    assert configs["frozen"]["aggregator"]["lr"] == chosen["frozen"][1] in (1e-4, 1e-3)
    assert configs["e2e"]["encoder"]["lr"] == chosen["e2e"][0] in (1e-4, 1e-3)
    best = min((t for t in tuning["trials"] if t["arm"] == "e2e"), key=lambda t: t["best_val_loss"])
    assert chosen["e2e"][0] == best["lr"]
    # linear probes: the pretrained encoder and each fine-tuned run, on the same test tiles
    probes = results["probes"]
    assert [(p["stage"], p["model"]) for p in probes] == [("pretrained", None), ("fine-tuned", "e2e"),
                                                           ("fine-tuned", "e2e-cache")]
    assert all(0 <= p["probe_auc"] <= 1 and p["test_positive_tiles"] > 0 for p in probes)
    assert len({p["test_tiles"] for p in probes}) == 1
    # fine-tuning changed the encoder the probe reads
    assert probes[0]["probe_auc"] != probes[1]["probe_auc"]


def test_e2e_vs_frozen_vit_arms_fine_tune_what_they_say(tmp_path: Path) -> None:
    from fullslide.experiments import e2e_vs_frozen as ef

    settings = ef.Settings.quick(archs=("vit",))
    assert settings.arms("vit") == ("frozen", "e2e", "e2e-lastN", "e2e-lora")
    spec = settings.pretrain_spec("out-of-domain", "vit")
    assert (spec.encoder, spec.lesions) == ("vit_tiny_patch16_224", False)
    assert settings.pretrain_spec("in-domain", "vit").lesions
    from fullslide.experiments.common import run_config

    made = {arm: run_config(tmp_path / arm, tmp_path / "c.csv", tmp_path / "tiles", weights=tmp_path / "w.safetensors",
                            seed=0, epochs=1, encoder_lr=1e-4, **ef.arm_overrides(settings, "vit", arm))
            for arm in settings.arms("vit")}
    assert made["e2e-lastN"].encoder.trainable_blocks == settings.last_blocks
    assert made["e2e-lora"].encoder.lora_rank == settings.lora_rank
    assert made["e2e"].encoder.trainable_blocks is None and made["e2e"].encoder.lora_rank == 0
    assert all(c.encoder.kwargs["patch_size"] == 8 for c in made.values())
    assert {c.train.tiles_per_slide for c in made.values()} == {"all"}


def test_pretrain_trains_a_small_vit_that_loads_with_its_kwargs(tiled: Path, tmp_path: Path) -> None:
    from fullslide.models import create_encoder
    from fullslide.train.pretrain import PretrainSettings, pretrain

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    out = tmp_path / "vit.safetensors"
    record = pretrain(tiled, out, PretrainSettings(encoder="vit_tiny_patch16_224", encoder_kwargs=kwargs, epochs=1,
                                                   tiles_per_slide=32, batch=16))
    assert record["settings"]["encoder_kwargs"] == kwargs
    encoder = create_encoder("vit_tiny_patch16_224", weights=out, tile_px=32, **kwargs)  # strict load
    trained = load_file(out)
    assert torch.equal(encoder.backbone.state_dict()["blocks.1.attn.qkv.weight"], trained["blocks.1.attn.qkv.weight"])


def test_experiment_arguments_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fullslide.experiments.k_sweep import parse_ks

    assert parse_ks("8, 32,ALL") == [8, 32, "all"]
    for bad in ("8,0", "8,x", "8,8", ""):
        with pytest.raises(ConfigError, match="--ks"):
            parse_ks(bad)
    assert main(["experiment", "e2e-vs-frozen", "--out", str(tmp_path), "--signals", "focal,spots"]) == 2
    assert "--signals" in capsys.readouterr().err
    # one folder, one experiment: other settings are refused before anything runs
    from fullslide.experiments.common import check_settings

    check_settings(tmp_path / "exp", "k-sweep", {"ks": [8, "all"], "slides": 12})
    check_settings(tmp_path / "exp", "k-sweep", {"ks": [8, "all"], "slides": 12})  # the same: accepted
    assert main(["experiment", "k-sweep", "--out", str(tmp_path / "exp"), "--quick", "--ks", "8"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "use another --out" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "exp" / "workspace").exists()


def test_an_experiment_stopped_by_sigterm_to_its_process_group_resumes_where_it_stopped(tmp_path: Path) -> None:
    """Slurm's SIGTERM reaches the experiment and its loader workers: it checkpoints the run in flight and exits
    143; the same command then resumes that run from its checkpoint, with the uninterrupted run's result."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "fullslide.cli", "experiment", "k-sweep", "--out", str(out), "--quick",
                "--seeds", "1", "--ks", "8"]

    out = tmp_path / "stopped"
    proc = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    checkpoint = out / "runs" / "k8_seed0" / "run" / "checkpoints" / "last.json"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert not (out / "runs" / "k8_seed0" / "result.json").exists()
    again = subprocess.run(command(out), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming the interrupted run" in again.stderr
    fresh = subprocess.run(command(tmp_path / "fresh"), capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    got, want = (json.loads((o / "results.json").read_text())["runs"][0] for o in (out, tmp_path / "fresh"))
    assert got["train_loss_by_epoch"] == pytest.approx(want["train_loss_by_epoch"], abs=1e-6)
    assert got["test_auc"] == pytest.approx(want["test_auc"], abs=1e-9)
