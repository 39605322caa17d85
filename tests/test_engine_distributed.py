"""Multi-process engine tests (gloo on CPU): every layout and mode gives the single-process gradient."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fullslide.cli import main
from fullslide.proof.checkgrad import CheckSpec, run_checks
from fullslide.engine.mesh import ParallelDims, chunk_bounds, rank_tile_range, slides_for_group

TESTS = str(Path(__file__).parent)


@pytest.fixture
def factories_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers are fresh processes: let them import tests/engine_factories.py like a user's module."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])))


def test_all_layouts_and_modes_match_reference(factories_importable: None) -> None:
    # User factory encoder with dropout and drop-path; GMA has dropout too. K per slide unequal and not
    # divisible by ranks or chunks (17 = 8+8+1: with 4 ranks one rank holds none of that slide).
    spec = CheckSpec(encoder="engine_factories:residual_droppath", tiles=[24, 17, 9, 30], slides=4, chunk_tiles=8,
                     tile_px=16, steps=3)
    rows, _ = run_checks(spec, [1, 2, 4], tol=1e-5, progress=lambda m: None)
    layouts = {(r.nproc, r.tile_parallel, r.mode) for r in rows}
    assert len(layouts) == len(rows) == 6 * (1 + 2 + 3)  # full, checkpoint, recompute, auto at three budgets
    assert (4, 2, "recompute") in layouts and (4, 2, "auto-half") in layouts  # 2 slide groups of 2 ranks each
    bad = [r for r in rows if not r.ok]
    assert not bad, bad
    assert all(r.encoder_grad < 1e-5 and r.aggregator_grad < 1e-5 and r.updates < 1e-5 for r in rows)


def test_check_grad_cli_passes_and_fails_on_tolerance(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["check-grad", "--nproc", "2", "--mode", "recompute", "--tiles", "10,7", "--slides", "2", "--chunk", "3",
            "--tile-size", "16", "--steps", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2/2 configurations within tolerance 5e-05 (every rank compared)" in out
    assert main(args + ["--tol", "0"]) == 1  # rounding differences exist, so a zero tolerance must fail
    assert "FAIL" in capsys.readouterr().out


def test_check_grad_stopped_by_sigterm_leaves_no_folder_and_no_worker(tmp_path: Path) -> None:
    """A scheduler's SIGTERM mid-launch: check-grad exits 143, its workers are gone and so is its temporary folder
    (which, while it runs, holds the references and the ranks' verdicts only)."""
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "fullslide.cli", "check-grad", "--nproc", "2", "--mode",
                             "full,recompute", "--steps", "3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("fullslide-checkgrad-*/specs_2.json")):  # the workers are being launched
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    folder = next(tmp_path.glob("fullslide-checkgrad-*"))
    assert all(f.suffix == ".json" or f.name.startswith("ref") for f in folder.iterdir())
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert not folder.exists()
    time.sleep(0.5)
    workers = []  # processes whose command line names the folder (Linux /proc)
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if folder.name in cmdline.read_bytes().decode(errors="replace"):
                workers.append(cmdline.parent.name)
        except OSError:  # a process that ended meanwhile
            continue
    assert workers == []


def test_parallel_dims_validate_and_name_factors() -> None:
    with pytest.raises(ValueError, match="world_size 6 is not divisible by tile_parallel 4"):
        ParallelDims(world_size=6, tile_parallel=4)
    dims = ParallelDims(world_size=8, tile_parallel=4)
    assert dims.slide_groups == 2
    assert [dims.group_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert dims.group_ranks(1) == [4, 5, 6, 7]


@pytest.mark.parametrize("k,chunk,t", [(17, 8, 4), (100, 7, 3), (5, 64, 2), (64, 8, 8), (1, 1, 4)])
def test_tile_shares_are_contiguous_whole_chunks_covering_every_tile_once(k: int, chunk: int, t: int) -> None:
    ranges = [rank_tile_range(k, chunk, r, t) for r in range(t)]
    assert ranges[0][0] == 0 and ranges[-1][1] == k
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    starts = {s for s, _ in chunk_bounds(k, chunk)} | {k}
    assert all(s in starts and e in starts for s, e in ranges)
    sizes = [(e - s + chunk - 1) // chunk for s, e in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_slides_split_round_robin_over_groups() -> None:
    groups = [slides_for_group(7, 3, g) for g in range(3)]
    assert sorted(sum(groups, [])) == list(range(7))
    assert groups[0] == [0, 3, 6]


# trainable_blocks and grad_checkpointing on a 12-block ViT: the suite's last-blocks and lora scenarios
# (tests/test_engine_controls.py); here the recipe path (UNI's architecture, reduced) with LoRA.
@pytest.mark.parametrize("control", ["lora"])
def test_fine_tuning_controls_are_exact_on_a_vit_recipe(control: str) -> None:
    """A foundation-model recipe (UNI's architecture, reduced) under a fine-tuning control, 2 processes."""
    spec = CheckSpec(encoder="uni", encoder_kwargs={"depth": 3, "img_size": 32, "embed_dim": 64, "num_heads": 4},
                     tiles=[10, 7], slides=2, chunk_tiles=4, tile_px=32, steps=2,
                     trainable_blocks=1 if control == "trainable_blocks" else None,
                     lora_rank=4 if control == "lora" else 0, grad_checkpointing=control == "grad_checkpointing",
                     modes=["full", "checkpoint", "recompute", "auto-half"])
    rows, _ = run_checks(spec, [2], tol=5e-5, progress=lambda m: None)
    assert len(rows) == 8 and all(r.ok for r in rows), rows


def test_fine_tuning_controls_choose_the_trained_parameters_and_their_learning_rates() -> None:
    from fullslide.models import create_encoder
    from fullslide.models.finetune import LoRALinear, add_lora, layer_decay_groups, train_last_blocks

    kwargs = {"depth": 4, "img_size": 32, "embed_dim": 32, "num_heads": 2}
    enc = create_encoder("uni", **kwargs)
    train_last_blocks(enc, 2)
    trained = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trained and all(".blocks.2." in n or ".blocks.3." in n or n.endswith(("norm.weight", "norm.bias"))
                           for n in trained)
    assert any(".blocks.2." in n for n in trained) and not any(".blocks.1." in n for n in trained)
    enc = create_encoder("uni", **kwargs)
    groups = layer_decay_groups(enc, lr=1.0, weight_decay=0.1, decay=0.5)
    lrs = {round(g["lr"], 6) for g in groups}
    assert max(lrs) == 1.0 and min(lrs) == 0.5**5  # final norm at 1, embeddings at decay^(depth + 1)
    enc = create_encoder("uni", **kwargs)
    assert add_lora(enc, rank=2, alpha=4, dropout=0.0, targets=["qkv"]) == 4
    trained = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    x = torch.rand(2, 3, 32, 32)
    lora = next(m for m in enc.modules() if isinstance(m, LoRALinear))
    before = enc(x)
    torch.nn.init.normal_(lora.lora_b)
    assert not torch.allclose(enc(x), before)  # the adapter is in the forward path
