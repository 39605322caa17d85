"""Stain normalisation (Macenko, Reinhard): the fits recover known stains, the device transforms equal float64
references written here from the published formulas, and training, extraction and inference all see the
normalised pixels."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fullslide.data.stain import StainNormalizer, fit_macenko, fit_reinhard

# Ruifrok & Johnston's H and E optical-density vectors and a second "site" with other stains (unit columns)
HE_A = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
HE_C = np.array([[0.50, 0.20], [0.80, 0.90], [0.33, 0.40]])
HE_A, HE_C = (m / np.linalg.norm(m, axis=0) for m in (HE_A, HE_C))


def render(he: np.ndarray, conc: np.ndarray, io: float = 240.0) -> np.ndarray:
    """uint8 RGB [..., 3] of concentrations [..., 2] through stain vectors (Beer-Lambert)."""
    return np.clip(io * np.exp(-(conc @ he.T)) - 1.0, 0, 255).round().astype(np.uint8)


def concentrations(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    conc = np.stack([rng.gamma(2.0, 0.35, n), rng.gamma(2.0, 0.25, n)], axis=1)
    conc[: n // 5] = 0.0  # background pixels (no stain)
    return conc


def test_macenko_fit_recovers_the_stain_vectors() -> None:
    for he in (HE_A, HE_C):
        fitted = np.array(fit_macenko(render(he, concentrations(40_000)).reshape(-1, 3).astype(float))["he"])
        cos = (fitted * he).sum(axis=0)  # columns are unit vectors: H first, then E
        assert cos.min() > 0.99, cos


def _macenko_reference(rgb: np.ndarray, src: dict, ref: dict, io: float = 240.0) -> np.ndarray:
    """Per-pixel float64 Macenko normalisation from the paper's steps (least-squares concentrations)."""
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / io)
    conc, *_ = np.linalg.lstsq(np.array(src["he"]), od.T, rcond=None)
    conc *= (np.array(ref["max_c"]) / np.array(src["max_c"]))[:, None]
    out = io * np.exp(-(np.array(ref["he"]) @ conc)).T
    return np.clip(np.floor(out + 0.5), 0, 255).reshape(rgb.shape)


def _reinhard_reference(rgb: np.ndarray, src: dict, ref: dict) -> np.ndarray:
    """Reinhard et al. 2001: RGB -> LMS (eq. 4) -> log10 -> lαβ (eq. 6), scale, and back."""
    to_lms = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
    to_lab = np.array([[1 / math.sqrt(3), 0, 0], [0, 1 / math.sqrt(6), 0], [0, 0, 1 / math.sqrt(2)]]) @ np.array(
        [[1, 1, 1], [1, 1, -2], [1, -1, 0]])
    x = rgb.reshape(-1, 3).astype(np.float64)
    lab = np.log10(np.maximum(x @ to_lms.T, 1e-6)) @ to_lab.T
    lab = (lab - np.array(src["mean"])) / np.array(src["std"]) * np.array(ref["std"]) + np.array(ref["mean"])
    out = (10.0 ** (lab @ np.linalg.inv(to_lab).T)) @ np.linalg.inv(to_lms).T
    return np.clip(np.floor(out + 0.5), 0, 255).reshape(rgb.shape)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_device_transform_equals_the_published_formulas(method: str) -> None:
    tiles = render(HE_C, concentrations(4 * 24 * 24, seed=1)).reshape(4, 24, 24, 3)
    ref_img = render(HE_A, concentrations(30_000, seed=2)).reshape(-1, 3).astype(float)
    fitter = fit_macenko if method == "macenko" else fit_reinhard
    src, ref = fitter(tiles.reshape(-1, 3).astype(float)), fitter(ref_img)
    got = StainNormalizer(method, ref)(torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous(), src)
    assert got.dtype == torch.uint8
    want = (_macenko_reference if method == "macenko" else _reinhard_reference)(tiles, src, ref)
    diff = np.abs(got.permute(0, 2, 3, 1).numpy().astype(float) - want)
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert np.abs(tiles.astype(float) - want).mean() > 5  # the transform changes the colours


@pytest.mark.parametrize("method, bound", [("macenko", 0.35), ("reinhard", 0.85)])
def test_normalising_undoes_a_site_stain_shift(method: str, bound: float) -> None:
    """The same tissue (concentrations) stained at two sites: after normalisation to one reference the two
    images agree better than before - far better with Macenko, which models the stain vectors; Reinhard only
    matches colour statistics (the per-pixel change of hue between the stains remains)."""
    conc = concentrations(64 * 64, seed=3)
    site_a, site_c = render(HE_A, conc), render(HE_C, conc * np.array([1.3, 0.8]))
    ref_img = render(HE_A, concentrations(30_000, seed=4)).astype(float)
    fitter = fit_macenko if method == "macenko" else fit_reinhard
    norm = StainNormalizer(method, fitter(ref_img))

    def apply(img: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(img.reshape(1, 64, 64, 3)).permute(0, 3, 1, 2).contiguous()
        return norm(t, fitter(img.astype(float))).permute(0, 2, 3, 1).numpy().reshape(-1, 3).astype(float)

    before = np.abs(site_a.astype(float) - site_c.astype(float)).mean()
    after = np.abs(apply(site_a) - apply(site_c)).mean()
    assert after < bound * before, (before, after)
    if method == "reinhard":  # what it does promise: the tissue's lαβ statistics become the reference's
        for img in (site_a, site_c):
            got = fit_reinhard(apply(img))
            assert np.allclose(got["mean"], norm.reference["mean"], atol=0.02), (got, norm.reference)
            assert np.allclose(got["std"], norm.reference["std"], rtol=0.1, atol=0.005)


def _config(tmp: Path, cohort: Path, **data):
    from fullslide.train.config import config_from_dict

    return config_from_dict({
        "run_dir": str(tmp / "run"),
        "data": {"cohort": str(cohort), "target_mpp": 2.0, "tile_px": 32, "split_method": "column",
                 "stain_normalize": "macenko", **data},
        "encoder": {"name": "tinycnn"}, "aggregator": {"name": "mean"},
        "augment": {"flip": False, "rot90": False, "blur_p": 0.0, "jitter": 0.0},
        "train": {"epochs": 1, "tiles_per_slide": "all", "slides_per_step": 1, "loader_workers": 0, "mode": "full"},
        "eval": {"bootstrap": 0},
    })


def _normalised_tiles(run: Path, source, identity: bool = False) -> torch.Tensor:
    from fullslide.slides import open_slide, read_coords

    store = json.loads((run / "stain_macenko.json").read_text())
    coords, geometry = read_coords(source.coords_h5)
    with open_slide(source.path) as slide:
        tiles = torch.from_numpy(slide.read_tiles(coords, geometry, channels_first=True))
    if identity:
        return tiles
    return StainNormalizer("macenko", store["_reference"]["params"])(tiles, store[source.slide_id]["params"])


def test_training_and_extraction_see_the_normalised_pixels(split_cohort: Path, tmp_path: Path) -> None:
    """Every tile the encoder sees in a training epoch (K = all, no augmentation) is its slide's normalised tile:
    the pixel sum over the epoch equals that of the normalised tiles; extracted features are the encoder's
    features of the normalised tiles."""
    from fullslide.train.evaluate import extract
    from fullslide.train.setup import prepare_data
    from fullslide.train.trainer import Trainer

    config = _config(tmp_path, split_cohort)
    trainer = Trainer(config, progress=False)
    seen: list[int] = []
    original_setup = trainer._setup

    def setup_with_hook() -> None:
        original_setup()
        trainer.model.encoder.register_forward_pre_hook(
            lambda m, args: seen.append(int(args[0].long().sum())) if m.training else None)

    trainer._setup = setup_with_hook
    run = trainer.run()
    store = json.loads((run / "stain_macenko.json").read_text())
    assert store["_reference"]["params"]["max_c"] == [1.9705, 1.0308]  # Macenko's published reference
    train_sources = [s for s in trainer.data.split_sources("train")]
    assert all(store[s.slide_id]["params"]["he"] for s in train_sources)
    assert sum(seen) == sum(int(_normalised_tiles(run, s).long().sum()) for s in train_sources)

    from dataclasses import replace

    import h5py
    from safetensors.torch import save_file

    weights = tmp_path / "encoder.safetensors"  # extract with the trained encoder, known to the test
    save_file({k: v.contiguous() for k, v in trainer.model.encoder.backbone.state_dict().items()}, str(weights))
    config = replace(config, encoder=replace(config.encoder, weights=str(weights)))
    target, n_ok, _ = extract(config, out=tmp_path / "feats")
    assert n_ok == 4 and (target / "stain_macenko.json").is_file()
    source = train_sources[0]
    with h5py.File(target / "features" / f"{source.slide_id}.h5") as h5:
        stored = torch.from_numpy(h5["features"][:])
    encoder = trainer.model.encoder.eval()
    with torch.no_grad():
        want = encoder(_normalised_tiles(run, source))
        raw = encoder(_normalised_tiles(run, source, identity=True))
    torch.testing.assert_close(stored, want, rtol=1e-4, atol=1e-4)
    assert float((stored - raw).abs().max()) > 1e-2  # normalisation changes the features


def test_reinhard_without_a_reference_is_one_clear_error(split_cohort: Path, tmp_path: Path) -> None:
    from fullslide.errors import ConfigError
    from fullslide.train.trainer import train

    with pytest.raises(ConfigError, match="reinhard needs data.stain_reference"):
        train(_config(tmp_path, split_cohort, stain_normalize="reinhard"), progress=False)
