"""``train.context: cache``: the aggregator sees every tile of the slide (K fresh features + the cached rest), the
encoder back-propagates through the K; the cache is versioned so a resumed run reads what the uninterrupted one
read (resume after signals and kill -9: tests/test_resume_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fullslide.engine import Bag, step
from fullslide.models import create_model
from fullslide.proof.checkgrad import max_rel_error
from fullslide.proof.probes import add_probes
from fullslide.proof.reference import reference_step
from fullslide.train.context import ContextCache, context_rows, replace_rows


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["full", "recompute", "auto"])
def test_context_rows_join_the_aggregator_and_give_the_encoder_no_gradient(mode: str) -> None:
    torch.manual_seed(0)
    model = add_probes(create_model("tinycnn", "gma", 2, tile_px=16, drop_rate=0.2).train(), 0.2)
    gen = torch.Generator().manual_seed(1)
    tiles = [torch.randint(0, 256, (k, 3, 16, 16), generator=gen, dtype=torch.uint8) for k in (11, 6)]
    contexts = [torch.randn(30, model.encoder.feature_dim, generator=gen), torch.zeros(0, model.encoder.feature_dim)]
    y = torch.tensor([1, 0])
    reference_step(model, tiles, y, F.cross_entropy, chunk_tiles=4, aggregator_chunk_tiles=8, step_seed=3,
                   contexts=contexts)
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    result = step(model, [Bag(index=i, tiles=t, context=c) for i, (t, c) in enumerate(zip(tiles, contexts))], y,
                  F.cross_entropy, mode=mode, memory_budget=10**12 if mode == "auto" else None, chunk_tiles=4,
                  aggregator_chunk_tiles=8, step_seed=3)
    got = _grads(model)
    assert set(got) == set(ref) and max_rel_error(got, ref) < 1e-5
    assert [len(result.attention[i]) for i in range(2)] == [11 + 30, 6]  # the aggregator saw K + M rows
    assert [tuple(result.fresh_features[i].shape) for i in range(2)] == [(11, model.encoder.feature_dim),
                                                                          (6, model.encoder.feature_dim)]
    # the context matters: other cached rows give another gradient
    model.zero_grad(set_to_none=True)
    step(model, [Bag(index=i, tiles=t, context=c * 0.5) for i, (t, c) in enumerate(zip(tiles, contexts))], y,
         F.cross_entropy, mode=mode, memory_budget=10**12 if mode == "auto" else None, chunk_tiles=4,
         aggregator_chunk_tiles=8, step_seed=3)
    assert max_rel_error(_grads(model), ref, "aggregator.") > 1e-3


def test_context_rows_leave_out_exactly_the_sampled_tiles() -> None:
    rows = torch.arange(10.0)[:, None].repeat(1, 3)  # row i holds i
    sampled = np.array([1, 4, 4, 9])  # a slide with fewer tiles than K repeats some
    assert context_rows(rows, sampled)[:, 0].tolist() == [0, 2, 3, 5, 6, 7, 8]


def test_fresh_rows_replace_their_own_tiles_and_a_repeated_tile_takes_its_last_draw() -> None:
    rows = torch.zeros(8, 2)
    sampled = np.array([2, 5, 5, 7])
    fresh = torch.tensor([[1.0, 1], [2, 2], [3, 3], [4, 4]])
    out = replace_rows(rows, sampled, fresh)
    want = rows.clone()
    for i, tile in enumerate(sampled):  # written out: later draws overwrite earlier ones
        want[tile] = fresh[i]
    assert torch.equal(out, want) and torch.equal(rows, torch.zeros(8, 2))  # the input is not modified


def test_versions_read_roll_back_and_prune(tmp_path: Path) -> None:
    cache = ContextCache(tmp_path)
    rows = torch.ones(4, 2)
    cache.write(cache_id := "s@1", 1, rows)  # the extraction before step 0 (ids may hold '@')
    cache.write_step(cache_id, 0, rows * 2)  # after step 0
    cache.write_step(cache_id, 2, rows * 3)  # after step 2
    assert cache.read(cache_id, 0)[0, 0] == 1 and cache.read(cache_id, 1)[0, 0] == 2
    assert cache.read(cache_id, 3)[0, 0] == 3 and cache.read("other", 3) is None
    assert cache.rollback(2) == 1  # resuming before step 2: step 2's write goes
    assert cache.read(cache_id, 5)[0, 0] == 2
    cache.prune(2)  # a checkpoint before step 2 keeps the version step 2 reads
    assert cache.versions(cache_id) == [2]
    assert cache.read(cache_id, 2).dtype == torch.float16  # stored as float16 by default; cast on the device


def test_training_writes_the_fresh_rows_into_the_sampled_tiles_only(tmp_path: Path, real_svs: Path) -> None:
    from fullslide.data.sampler import TileSampler
    from fullslide.train.inference import extract_features
    from fullslide.train.setup import build_model
    from fullslide.train.trainer import Trainer
    from test_app import app_config, make_app_cohort

    cohort = make_app_cohort(tmp_path, real_svs)
    config = app_config(tmp_path, cohort, train={"epochs": 1, "slides_per_step": 1, "tiles_per_slide": 8,
                                                 "context": "cache", "context_dtype": "float32"})
    trainer = Trainer(config, progress=False)
    run = trainer.run()
    initial = build_model(config, trainer.n_out)  # the same seeded initial encoder the cache was filled with
    first = {s.slide_id: f for s, f, _ in extract_features(initial.encoder, trainer.train_src, chunk_tiles=64)}
    plans = TileSampler([s.n_tiles for s in trainer.train_src], k=8, slides_per_step=1, seed=0).epoch(0)
    cache = ContextCache(run)
    for plan in plans:
        slide_id = trainer.train_ids[plan.slides[0]]
        rows = cache.read(slide_id, 10**6)
        sampled = np.zeros(len(rows), dtype=bool)
        sampled[plan.tiles[0]] = True
        assert torch.allclose(rows[~sampled], first[slide_id][~sampled], atol=1e-4), slide_id  # untouched rows
        assert (rows[sampled] - first[slide_id][sampled]).abs().max() > 1e-3, slide_id  # fresh, augmented rows
