"""Epoch plans and tile augmentation: seeded, fresh each epoch, independent of the rank layout."""

from __future__ import annotations

import numpy as np
import pytest

from fullslide.data.augment import Augment, augment_tile, augment_tiles
from fullslide.data.sampler import TileSampler, draw_tiles, step_seed


def test_plans_are_seeded_and_fresh_each_epoch() -> None:
    sampler = TileSampler([500, 40, 300, 90, 1000], k=64, slides_per_step=2, seed=3)
    a, b = sampler.epoch(0), sampler.epoch(0)
    assert [p.slides for p in a] == [p.slides for p in b]
    assert all(np.array_equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa.tiles, pb.tiles))
    c = sampler.epoch(1)
    assert [p.slides for p in a] != [p.slides for p in c] or any(
        not np.array_equal(x, y) for pa, pc in zip(a, c) for x, y in zip(pa.tiles, pc.tiles))
    assert sorted(i for p in a for i in p.slides) == list(range(5))  # every slide once per epoch
    assert [len(p.slides) for p in a] == [2, 2, 1] and sampler.steps_per_epoch == 3


def test_k_tiles_without_replacement_or_all_plus_repeats() -> None:
    rng = np.random.default_rng(0)
    picked = draw_tiles(100, 30, rng)
    assert len(picked) == 30 and len(set(picked.tolist())) == 30 and np.all(np.diff(picked) > 0)
    few = draw_tiles(10, 25, rng)
    assert len(few) == 25 and set(few.tolist()) == set(range(10))  # every tile, then repeats
    assert np.array_equal(draw_tiles(7, "all", rng), np.arange(7))


def test_epoch_fraction_draws_a_subset() -> None:
    sampler = TileSampler([50] * 10, k=8, slides_per_step=3, epoch_fraction=0.5, seed=0)
    plans = sampler.epoch(2)
    assert sum(len(p.slides) for p in plans) == 5 == sampler.slides_per_epoch
    assert step_seed(0, 1, 2) == step_seed(0, 1, 2) != step_seed(0, 1, 3)


def _tiles(n: int = 6, px: int = 16) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, px, px, 3), dtype=np.uint8)


def test_geometric_augmentations_only_move_pixels() -> None:
    tile = _tiles(1)[0]
    out = augment_tile(tile, Augment(flip=True, rot90=True, blur_p=0, jitter=0), np.random.default_rng(5))
    assert out.shape == tile.shape and out.dtype == np.uint8
    assert sorted(out.reshape(-1, 3).tolist()) == sorted(tile.reshape(-1, 3).tolist())


def test_blur_and_jitter_change_values_within_range() -> None:
    tile = _tiles(1)[0]
    out = augment_tile(tile, Augment(flip=False, rot90=False, blur_p=1.0, jitter=0.2), np.random.default_rng(2))
    assert out.dtype == np.uint8 and not np.array_equal(out, tile)
    assert out.astype(float).std() < tile.astype(float).std()  # blur smooths noise


def test_augmentation_is_keyed_by_tile_position_not_by_rank_share() -> None:
    tiles, aug = _tiles(6), Augment()
    whole = augment_tiles(tiles, aug, seed=0, epoch=1, slide=4, positions=np.arange(6))
    share = augment_tiles(tiles[2:5], aug, seed=0, epoch=1, slide=4, positions=np.arange(2, 5))
    assert np.array_equal(whole[2:5], share)
    other = augment_tiles(tiles, aug, seed=0, epoch=2, slide=4, positions=np.arange(6))
    assert not np.array_equal(whole, other)


@pytest.mark.parametrize("n", [1, 2])
def test_no_augmentation_returns_tiles_unchanged(n: int) -> None:
    tiles = _tiles(n)
    off = Augment(flip=False, rot90=False, blur_p=0, jitter=0)
    assert augment_tiles(tiles, off, seed=0, epoch=0, slide=0, positions=np.arange(n)) is tiles


def _real_tiles(k: int = 12, px: int = 32) -> np.ndarray:
    """Tiles with structure (gradients and blobs), not flat noise, so flips, rotations and blur all show."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:px, 0:px]
    base = np.stack([xx * 7 % 256, yy * 5 % 256, (xx + yy) * 3 % 256], axis=-1).astype(np.float32)
    return np.clip(base[None] + rng.normal(0, 25, (k, px, px, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("settings", [dict(), dict(blur_p=1.0, jitter=0.0), dict(blur_p=0.0, jitter=0.2),
                                      dict(flip=False, rot90=False, blur_p=0.5, jitter=0.1)])
def test_batched_device_augmentation_equals_the_per_tile_reference(settings: dict) -> None:
    import torch

    from fullslide.data.augment import augment_batch

    aug = Augment(**settings)
    tiles = _real_tiles()
    positions = np.arange(5, 5 + len(tiles))
    ref = augment_tiles(tiles, aug, seed=3, epoch=2, slide=4, positions=positions)  # numpy, per tile
    chw = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    got = augment_batch(chw, aug, seed=3, epoch=2, slide=4, positions=positions).permute(0, 2, 3, 1).numpy()
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05  # float32 rounding only
    assert not np.array_equal(got, tiles)  # it did something
    # a tile's pixels do not depend on the batch it is in: any split of the K list gives the same pixels
    halves = [augment_batch(chw[s], aug, seed=3, epoch=2, slide=4, positions=positions[s])
              for s in (slice(0, 5), slice(5, None))]
    assert torch.equal(torch.cat(halves).permute(0, 2, 3, 1), torch.from_numpy(got))


def test_steps_read_in_parts_reassemble_exactly_and_bound_what_is_in_flight(synth_cohort) -> None:
    """A step split into parts of at most part_tiles tiles, read by workers in any number, is the same step."""
    import torch

    from fullslide.data.loader import SlideSource, StepDataset, assemble_steps, make_loader, prefetch_per_worker
    from fullslide.engine import ParallelDims
    from fullslide.slides import tile_slides

    out = tile_slides([synth_cohort], synth_cohort.parent / "tiles_parts", target_mpp=2.0, tile_px=16)
    sources = [SlideSource(r.slide_id, str(r.path), r.n_tiles, str(r.h5_path)) for r in out if r.n_tiles]
    plans = TileSampler([s.n_tiles for s in sources], k=37, slides_per_step=2, seed=1).epoch(0)
    dims = ParallelDims(world_size=2, tile_parallel=2)

    def steps(part_tiles: int, workers: int):
        ds = StepDataset(plans, sources, dims=dims, rank=1, chunk_tiles=8, part_tiles=part_tiles)
        assert all(stop - start <= part_tiles for _, _, start, stop in ds.parts)
        return ds, list(assemble_steps(make_loader(ds, workers=workers, prefetch=1), ds))

    whole_ds, whole = steps(10_000, 0)
    parts_ds, parts = steps(5, 2)
    assert len(parts_ds) > 2 * len(whole_ds)  # really split
    assert [s.step for s in parts] == [s.step for s in whole]
    for a, b in zip(parts, whole):
        assert a.positions == b.positions and a.k_totals == b.k_totals
        assert all(torch.equal(x, y) for x, y in zip(a.data, b.data))
    assert prefetch_per_worker(20_000, 1024, 8) == 2 and prefetch_per_worker(100, 1024, 8) == 1


def _reference_hed(rgb: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """HED jitter written from Ruifrok & Johnston's published stain vectors and Tellez et al.'s rule, in float64,
    pixel by pixel (no fullslide code)."""
    m = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    m = m / np.sqrt((m ** 2).sum(axis=1, keepdims=True))
    inv = np.linalg.inv(m)
    out = np.empty(rgb.shape)
    for idx in np.ndindex(rgb.shape[:2]):
        od = -np.log(np.maximum(rgb[idx].astype(float), 1.0) / 255.0)
        conc = od @ inv
        out[idx] = 255.0 * np.exp(-((conc * scale + shift) @ m))
    return out


def test_hed_jitter_follows_the_published_deconvolution_and_is_batched_exactly() -> None:
    import torch

    from fullslide.data.augment import augment_batch, draw, hed_jitter

    tile = _real_tiles(1)[0]
    scale, shift = np.array([1.05, 0.97, 1.0]), np.array([0.02, -0.03, 0.0])
    ours = hed_jitter(tile.astype(np.float32), scale, shift)
    assert np.abs(ours - _reference_hed(tile, scale, shift)).max() < 0.05
    # identity when nothing is jittered (up to the 1/255 floor of the logarithm)
    assert np.abs(hed_jitter(tile.astype(np.float32), np.ones(3), np.zeros(3)) - np.maximum(tile, 1)).max() < 0.01
    aug = Augment(flip=False, rot90=False, blur_p=0.0, jitter=0.0, hed_sigma=0.2, hed_bias=0.2)
    tiles, positions = _real_tiles(), np.arange(3, 15)
    d = draw(aug, seed=1, epoch=0, slide=2, positions=positions)
    assert (np.abs(d.hed_scale - 1) <= 0.2).all() and (np.abs(d.hed_shift) <= 0.2).all() and d.hed_scale.std() > 0
    ref = augment_tiles(tiles, aug, seed=1, epoch=0, slide=2, positions=positions)
    got = augment_batch(torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous(), aug, seed=1, epoch=0, slide=2,
                        positions=positions).permute(0, 2, 3, 1).numpy()
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05 and np.abs(got.astype(int) - tiles.astype(int)).mean() > 3
    # keyed by tile position: a rank's share gets the same stains as the whole K list
    share = augment_tiles(tiles[4:9], aug, seed=1, epoch=0, slide=2, positions=positions[4:9])
    assert np.array_equal(share, ref[4:9])
    # off by default, and adding it leaves the other draws (flips, blur, colour jitter) where they were
    assert not Augment().hed
    base = draw(Augment(), seed=1, epoch=0, slide=2, positions=positions)
    more = draw(Augment(hed_sigma=0.05, hed_bias=0.05), seed=1, epoch=0, slide=2, positions=positions)
    assert all(np.array_equal(getattr(base, f), getattr(more, f)) for f in ("flip_w", "flip_h", "rot", "blur", "jitter"))
