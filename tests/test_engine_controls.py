"""What the engine's gradient rests on besides the engine: auto's probe, the fine-tuning controls, the sampler,
the auto budget across slides, and check-grad's scenarios (every aggregator, bf16/fp16, LoRA, last blocks,
peaked attention, resnet18) against the independent reference."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fullslide.data.sampler import TileSampler
from fullslide.engine import Bag, step
from fullslide.engine import recompute
from fullslide.engine.budget import probe_encoder, step_bytes
from fullslide.models import create_encoder, create_model
from fullslide.models.finetune import layer_decay_groups, train_last_blocks
from fullslide.proof.checkgrad import run_checks
from fullslide.proof.suite import suite_specs

VIT12 = {"depth": 12, "img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2}


def _block_of(name: str) -> int | None:
    m = re.search(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def test_auto_probe_leaves_grads_parameters_buffers_and_rng_untouched() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", "gma", 2, tile_px=16, freeze_bn=False, drop_rate=0.5).train()
    tiles = torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8)
    for i, p in enumerate(model.parameters()):  # some parameters carry a gradient, some have none
        p.grad = torch.full_like(p, 0.5) if i % 2 else None
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    probe_encoder(model.encoder, tiles, device=torch.device("cpu"), amp_dtype=None, aggregator=model.aggregator)
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None), n
        assert p.grad is None or torch.equal(p.grad, grads[n]), n
        assert torch.equal(p.detach(), params[n]), n
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)


def test_layer_decay_gives_every_block_its_rate_at_depth_12() -> None:
    enc = create_encoder("vit_tiny_patch16_224", **VIT12)
    lr, decay = 1.0, 0.75
    rate = {id(p): g["lr"] for g in layer_decay_groups(enc, lr, 0.1, decay) for p in g["params"]}
    names = [n for n, _ in enc.named_parameters()]
    first_block = min(i for i, n in enumerate(names) if _block_of(n) is not None)
    checked = set()
    for i, (name, p) in enumerate(enc.named_parameters()):
        block = _block_of(name)
        layer = block + 1 if block is not None else (0 if i < first_block else 13)
        assert rate[id(p)] == pytest.approx(lr * decay ** (13 - layer), rel=1e-12), name
        checked.add(layer)
    assert checked == set(range(14))  # embeddings, blocks 0-11 (10 and 11 included), final norm


def test_trainable_blocks_train_exactly_the_last_blocks_and_what_follows() -> None:
    enc = create_encoder("vit_tiny_patch16_224", **VIT12)
    train_last_blocks(enc, 3)
    names = [n for n, _ in enc.named_parameters()]
    last_block = max(i for i, n in enumerate(names) if _block_of(n) is not None)
    expected = {n for i, n in enumerate(names) if (_block_of(n) or -1) >= 9 or i > last_block}
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == expected
    assert any(n.endswith("norm.weight") and _block_of(n) is None for n in expected)  # the final norm trains


def test_each_slide_draws_fresh_tiles_each_epoch() -> None:
    sampler = TileSampler([500, 400, 300, 900], k=32, slides_per_step=2, seed=3)

    def tiles_by_slide(epoch: int) -> dict[int, np.ndarray]:
        return {s: t for plan in sampler.epoch(epoch) for s, t in zip(plan.slides, plan.tiles)}

    first, second = tiles_by_slide(0), tiles_by_slide(1)
    assert set(first) == set(second) == {0, 1, 2, 3}
    for s in first:  # per slide, not merely a new slide order
        assert not np.array_equal(np.sort(first[s]), np.sort(second[s])), s


def test_auto_budget_is_shared_by_the_slides_of_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = create_model("tinycnn", "gma", 2, tile_px=16).train()
    slides = [torch.randint(0, 256, (k, 3, 16, 16), dtype=torch.uint8) for k in (16, 16, 16)]
    probe = probe_encoder(model.encoder, slides[0], device=torch.device("cpu"), amp_dtype=None,
                          aggregator=model.aggregator)
    budget = step_bytes(probe, kept_tiles=16, chunk_tiles=4, total_tiles=48, aggregator_tiles=16)  # one slide's worth
    kept: list[int] = []
    original = recompute.encode

    def spy(*args, **kwargs):
        kept.append(kwargs.get("keep_chunks") or 0)
        return original(*args, **kwargs)

    monkeypatch.setattr(recompute, "encode", spy)
    result = step(model, [Bag(index=i, tiles=t) for i, t in enumerate(slides)], torch.tensor([0, 1, 0]),
                  F.cross_entropy, mode="auto", memory_budget=budget, chunk_tiles=4, aggregator_chunk_tiles=16)
    assert 0 < result.plan.kept_chunks < 12
    assert sum(kept) == result.plan.kept_chunks  # the plan's chunks are spread over the slides, not given to each


def test_check_grad_scenarios_match_the_reference() -> None:
    """The scenarios of ``check-grad --suite`` at 2 processes (both tile-parallel layouts, in one launch), but the
    ones CI runs elsewhere, to keep CI under 15 minutes on 2 cores: ``default`` (gma; tests/test_engine_distributed.py
    runs it at 1, 2 and 4 processes, every mode) and ``abmil``/``mean``/``max`` (every mode, one process, in
    tests/test_engine_step.py). Fewer modes here, chosen so that each scenario's own paths still run: ``auto-half``
    keeps about half the chunk graphs and recomputes the rest, so it runs both encoder paths in one mode (alone for
    bfloat16, the fine-tuning and context scenarios and resnet18; with ``full`` for float16's GradScaler); whole-slide
    aggregators (transformer, alibi, chief, gigapath-slide: the same aggregator path in every mode) ``recompute``;
    positions-gma ``full`` and ``recompute`` (its tile stage with a graph and streamed); peaked the two streamed modes.
    The spatial and slide-encoder scenarios make one engine call per step (accumulation is the other scenarios'),
    every scenario two steps. The suite itself (``fullslide check-grad --suite``) runs all of them in full."""
    import dataclasses

    one_call = ("positions-gma", "alibi", "chief", "gigapath-slide")  # accumulation is the other scenarios'
    modes = ({s: ["recompute"] for s in ("transformer", "alibi", "chief", "gigapath-slide")}
             | {s: ["auto-half"] for s in ("bfloat16", "lora", "last-blocks", "context", "resnet18")}
             | {"float16": ["full", "auto-half"], "positions-gma": ["full", "recompute"],
                "peaked": ["recompute", "auto-half"]})
    fewer_tiles = {"resnet18": [12, 9, 5], "chief": [7, 5, 9]}  # the costliest encoders: smaller slides suffice
    specs = [dataclasses.replace(s, modes=modes.get(s.name, s.modes), tiles=fewer_tiles.get(s.name, s.tiles),
                                 steps=min(s.steps, 2),  # two teacher-forced steps: still past the first update
                                 micro_batches=1 if s.name in one_call else s.micro_batches)
             for s in suite_specs() if s.name not in ("default", "abmil", "mean", "max")]
    rows, refs = run_checks(specs, [2], progress=lambda m: None)
    assert len(rows) == sum(len(s.modes) * 2 for s in specs)
    bad = [(r.scenario, r.tile_parallel, r.mode, r.worst, r.error) for r in rows if not r.ok]
    assert not bad, bad
    peaked = refs[[s.name for s in specs].index("peaked")]
    assert peaked.faint_chunks >= 10 and peaked.late_peaks >= 2  # the hard cases did occur
