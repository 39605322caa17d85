"""``fullslide experiment stain-shift``: does a model trained on two sites hold up on a third site's stains?

A ``focal`` synthetic cohort from three sites (``make_cohort(sites=3, site_shift=..., site_confounding=...)``): site A
stains with Ruifrok & Johnston's haematoxylin and eosin, sites B and C with their own (vectors turned, strengths
scaled). In the training sites the case mix differs by site, as in multi-site cohorts (Howard et al. 2021, Nat.
Commun. 12: 4423, on TCGA): most positives come from site A and most negatives from site B, so stain is a
shortcut to the label; site C's labels are independent of its stain. Patients of sites A and B train (75%) and
validate (25%); every slide of site C is the test split, so the test AUC measures generalisation to an unseen lab.
Each arm trains the same pretrained encoder end-to-end (same schedule, splits and seeds) and differs only in what
it does to the pixels:

- ``none``: colour as scanned (the default flips, rotations, blur and light colour jitter only);
- ``hed``: HED stain jitter (``augment.hed_sigma``/``hed_bias``);
- ``macenko``: Macenko normalisation to the published reference (``data.stain_normalize: macenko``);
- ``reinhard``: Reinhard normalisation to the first training slide of site A.

Normalisation is fitted per slide and applied in training, validation and test alike.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import statistics
from pathlib import Path
from typing import Any

from fullslide.atomic import atomic_write_text
from fullslide.experiments.common import (
    CohortSpec, PretrainSpec, cached_run, check_settings, prepare_cohort, prepare_encoder, run_config, train_and_test,
    write_results,
)

log = logging.getLogger("fullslide.experiment")
EXPERIMENT = "stain-shift"
ARMS = ("none", "hed", "macenko", "reinhard")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """One stain-shift experiment; ``quick()`` is the plumbing check."""

    slides: int = 48
    size: int = 2048
    signal: str = "focal"
    diffuse_strength: float = 0.5
    lesion_fraction: float = 0.03
    lesion_contrast: float = 0.4
    site_shift: float = 0.35
    site_confounding: float = 0.8
    stain_variation: float = 0.1
    cohort_seed: int = 0
    epochs: int = 8
    tiles_per_slide: int = 128
    encoder_lr: float = 2e-4
    hed_sigma: float = 0.05
    hed_bias: float = 0.05
    pretrain: PretrainSpec = PretrainSpec()

    @staticmethod
    def quick() -> "Settings":
        return Settings(slides=12, size=1024, lesion_fraction=0.08, epochs=1, tiles_per_slide=16,
                        pretrain=PretrainSpec.quick())


def _cohort_spec(s: Settings) -> CohortSpec:
    return CohortSpec(slides=s.slides, size=s.size, signal=s.signal, lesion_fraction=s.lesion_fraction,
                      lesion_contrast=s.lesion_contrast, diffuse_strength=s.diffuse_strength,
                      stain_variation=s.stain_variation, seed=s.cohort_seed)


def site_splits(labels: Path, out: Path) -> Path:
    """A copy of the labels CSV with a ``split`` column: site C is test; sites A and B patients 3:1 train:val."""
    rows = list(csv.DictReader(open(labels, newline="")))
    ab = [p for p in dict.fromkeys(r["patient_id"] for r in rows if r["site"] != "C")]
    val = set(ab[3::4])
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "label", "patient_id", "site", "split"])
        for r in rows:
            split = "test" if r["site"] == "C" else ("val" if r["patient_id"] in val else "train")
            w.writerow([r["slide_id"], str(labels.parent / r["path"]), r["label"], r["patient_id"], r["site"], split])
    return out


def arm_overrides(arm: str, settings: Settings, reference: str) -> dict[str, dict[str, Any]]:
    """Config sections an arm changes (on top of ``run_config``)."""
    if arm == "hed":
        return {"augment": {"hed_sigma": settings.hed_sigma, "hed_bias": settings.hed_bias}}
    if arm == "macenko":
        return {"data": {"stain_normalize": "macenko"}}
    if arm == "reinhard":
        return {"data": {"stain_normalize": "reinhard", "stain_reference": reference}}
    return {}


def run(out: str | Path, *, seeds: int, seed_offset: int = 0, quick: bool = False, arms: tuple[str, ...] = ARMS,
        settings: Settings | None = None) -> Path:
    """Run every arm and seed into ``out`` (resuming) and return the report's path."""
    out = Path(out)
    settings = settings or (Settings.quick() if quick else Settings())
    workspace = out / "workspace"
    check_settings(out, EXPERIMENT, {**dataclasses.asdict(settings), "arms": list(arms)})
    weights = prepare_encoder(workspace, settings.pretrain)
    labels, tiles = prepare_cohort(workspace, "cohort_sites", _cohort_spec(settings), sites=3,
                                   site_shift=settings.site_shift, site_confounding=settings.site_confounding)
    cohort = site_splits(labels, workspace / "cohort_sites_split.csv")
    reference = next(r["path"] for r in csv.DictReader(open(cohort)) if r["site"] == "A" and r["split"] == "train")
    rows: list[dict[str, Any]] = []
    for seed in range(seed_offset, seed_offset + seeds):
        for arm in arms:
            name = f"{arm}_seed{seed}"
            config = run_config(out / "runs" / name / "run", cohort, tiles, weights=weights, seed=seed,
                                epochs=settings.epochs, tiles_per_slide=settings.tiles_per_slide,
                                encoder_lr=settings.encoder_lr, split_method="column",
                                extra=arm_overrides(arm, settings, reference))
            result = cached_run(out / "runs", name, lambda config=config: train_and_test(config))
            rows.append({"arm": arm, "seed": seed, **result})
            log.info("%s seed %d: test AUC on site C %s (%.0f s)", arm, seed, result["test_auc"], result["seconds"])
    meta = {**dataclasses.asdict(settings), "arms": list(arms), "quick": quick, "reference": reference}
    write_results(out, EXPERIMENT, rows, meta)
    tile_figure(cohort, tiles, reference, out / "tiles.png")
    return report(out, rows, meta)


def tile_figure(cohort: Path, tiles: Path, reference: str, path: Path, per_site: int = 2) -> Path:
    """A tile of ``per_site`` slides of each site (columns), original, Macenko- and Reinhard-normalised (rows), as
    training sees them; the test site is C."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from fullslide.data import stain as st
    from fullslide.slides import open_slide, read_coords

    refs = {m: st.reference_params(m, None if m == "macenko" else reference, target_mpp=1.0, tile_px=64)
            for m in ("macenko", "reinhard")}
    rows = list(csv.DictReader(open(cohort)))
    picked = [r for site in "ABC" for r in [r for r in rows if r["site"] == site][:per_site]]
    columns = []
    for r in picked:
        h5 = tiles / "patches" / f"{r['slide_id']}.h5"
        coords, geometry = read_coords(h5)
        with open_slide(r["path"]) as slide:
            big = dataclasses.replace(geometry, tile_px=96, read_px=3 * geometry.read_px, level0_px=3 * geometry.level0_px)
            tile = torch.from_numpy(slide.read_tiles(coords[len(coords) // 2][None], big, channels_first=True))
        pixels = st.slide_pixels(r["path"], h5)
        column = [tile]
        for method in ("macenko", "reinhard"):
            column.append(st.StainNormalizer(method, refs[method])(tile, st.fit(method, pixels)))
        columns.append(torch.cat(column, dim=3)[0].permute(1, 2, 0).numpy())  # rows stacked vertically below
    grid = np.concatenate([np.concatenate(np.split(c, 3, axis=1), axis=0) for c in columns], axis=1)
    image = Image.new("RGB", (grid.shape[1] + 80, grid.shape[0] + 20), "white")
    image.paste(Image.fromarray(grid), (80, 20))
    draw = ImageDraw.Draw(image)
    for i, r in enumerate(picked):
        draw.text((80 + i * 96 + 4, 4), f"site {r['site']}" + (" (test)" if r["site"] == "C" else ""), fill="black")
    for j, label in enumerate(("original", "Macenko", "Reinhard")):
        draw.text((4, 20 + j * 96 + 40), label, fill="black")
    image.save(path)
    return path


def report(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """``out/report.md``: per arm, the test AUC on site C (mean, min and max over seeds, each seed with its CI)."""
    lines = [f"# Stain shift: train on sites A and B, test on site C (site shift {meta['site_shift']})", "",
             "| arm | test AUC on site C, mean [min, max] | per seed (95% bootstrap CI) | best epoch |",
             "|---|---|---|---|"]
    for arm in meta["arms"]:
        mine = [r for r in rows if r["arm"] == arm]
        aucs = [r["test_auc"] for r in mine if r["test_auc"] is not None]
        mean = f"{statistics.fmean(aucs):.3f} [{min(aucs):.3f}, {max(aucs):.3f}]" if aucs else "n/a"
        seeds = ", ".join(f"{r['test_auc']:.3f} ({r['test_auc_ci'][0]:.2f}-{r['test_auc_ci'][1]:.2f})"
                          if r["test_auc"] is not None and None not in r["test_auc_ci"] else "n/a" for r in mine)
        lines.append(f"| {arm} | {mean} | {seeds} | {', '.join(str(r['best_epoch']) for r in mine)} |")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
