"""`fullslide plan`: its predicted step memory per mode against what a real step holds (saved-tensor meter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fullslide.cli import main
from fullslide.engine import step
from fullslide.engine.budget import mode_activation_bytes, parse_bytes
from fullslide.engine.memory import SavedTensorMeter
from fullslide.train.config import config_from_dict
from fullslide.train.plan import plan_config
from fullslide.train.setup import build_model


def _config(encoder: str, budget: int | str):
    return config_from_dict({"encoder": {"name": encoder}, "data": {"tile_px": 32},
                             "train": {"tiles_per_slide": 96, "chunk_tiles": 16, "memory_budget": budget,
                                       "device": "cpu"}})


@pytest.mark.parametrize("encoder", ["tinycnn", "resnet18"])
def test_plan_predicts_the_measured_peak_of_each_mode(encoder: str) -> None:
    """Within 15% for full, recompute and auto (at a budget between the two, so auto keeps some graphs).
    checkpoint is left out of the measured comparison: its recomputation installs its own saved-tensor hooks,
    which hide the chunk graph from an outer meter."""
    wide = {m.mode: m for m in plan_config(_config(encoder, 10**12)).modes}
    budget = (wide["full"].step_bytes + wide["recompute"].step_bytes) // 2
    config = _config(encoder, budget)
    report = plan_config(config)
    predicted = {m.mode: m for m in report.modes}
    torch.manual_seed(0)
    model = build_model(config, 2).train()
    tiles = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for mode in ("full", "recompute", "auto"):
        with SavedTensorMeter() as meter:
            result = step(model, [tiles], torch.tensor([1]), F.cross_entropy, mode=mode, memory_budget=budget,
                          chunk_tiles=16)
        model.zero_grad(set_to_none=True)
        expected = predicted[mode].activation_bytes
        assert abs(meter.peak_bytes - expected) <= 0.15 * expected, (mode, meter.peak_bytes, expected)
    assert 0 < result.plan.kept_chunks < 6  # auto split the step
    assert predicted["full"].step_bytes > budget >= predicted["auto"].step_bytes
    assert predicted["auto"].compute == pytest.approx(1 + result.plan.recomputed_chunks / 6 / 3)
    # the largest K of full is the edge of the budget
    largest = predicted["full"].largest_k
    fits = lambda k: mode_activation_bytes(report.probe, "full", tiles=k, chunk_tiles=16, aggregator_chunk_tiles=1024,
                                           streams=True)[1] <= budget
    assert fits(largest) and not fits(largest + 1)


def test_plan_cli_for_a_gpu_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--set", "encoder.name=tinycnn", "--set", "data.tile_px=32", "--set",
                 "train.tiles_per_slide=4096", "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "precision bfloat16" in out and "budget 59.60 GiB" in out  # 80% of 80 GB
    for mode in ("auto", "full", "checkpoint", "recompute"):
        assert f"\n{mode} " in out
    assert main(["plan", "--set", "train.tiles_per_slide=all"]) == 2
    assert "--k" in capsys.readouterr().err


def test_memory_sizes_parse() -> None:
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512 MiB") == 2**29 and parse_bytes("0.5") == 0.5
    with pytest.raises(ValueError, match="not a memory size"):
        parse_bytes("lots")


def test_plan_counts_the_context_rows_and_the_aggregator_over_the_whole_slide() -> None:
    from fullslide.train.config import config_from_dict
    from fullslide.train.plan import plan_config

    raw = {"encoder": {"name": "tinycnn"}, "data": {"tile_px": 32}, "train": {"tiles_per_slide": 256}}
    plain = plan_config(config_from_dict(raw), device="cpu")
    raw["train"]["context"] = "cache"
    cached = plan_config(config_from_dict(raw), slide_tiles=20_000, device="cpu")
    rows = (20_000 - 256) * cached.probe.feature_dim * 4
    for a, b in zip(plain.modes, cached.modes):
        assert b.step_bytes - a.step_bytes >= rows, a.mode  # at least the N - K rows, plus the aggregator over them
    full = {m.mode: m for m in cached.modes}["full"]
    assert full.step_bytes - {m.mode: m for m in plain.modes}["full"].step_bytes >= rows + 19_000 * cached.probe.aggregator_bytes_per_tile
    assert "N = 20,000 tiles per slide" in cached.table()
