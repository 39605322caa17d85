"""Synthetic cohorts: procedural H&E-like pyramidal TIFFs with a known signal, and their labels.

Two signals: ``focal`` (positive slides hold a few small lesion foci of larger, darker, denser
nuclei, covering ``lesion_fraction`` of the tissue; the ground-truth mask is saved) and
``diffuse`` (every tissue region of a positive slide has slightly more nuclei and a bluer
background). Some patients have two slides that share their staining, so that patient-level
splitting matters. With ``sites`` > 1 patients come from sites A, B, C, ... in turn, and each site after A stains
with its own haematoxylin and eosin (vectors turned by about ``site_shift`` radians and strengths scaled by up to
``1 +- site_shift``), as scanners and labs differ; a ``site`` column names it. Everything is determined by ``seed``.

Layout of ``out_dir``: ``labels.csv`` (slide_id, path, label, patient_id, signal, lesion_mask;
paths relative to the CSV), ``slides/{slide_id}.tiff``, ``lesions/{slide_id}.png`` (positive
focal slides; one pixel per ``mask_downsample`` level-0 pixels, stored in the PNG's text).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np

from fullslide.atomic import atomic_path
from fullslide.errors import ConfigError
from fullslide.slides.grid import box_coverage
from fullslide.slides.synth_render import Appearance, SlideLayout, make_layout, render_region

Signal = Literal["focal", "diffuse"]
LABELS_CSV = "labels.csv"
CSV_COLUMNS = ("slide_id", "path", "label", "patient_id", "signal", "lesion_mask")
#: PNG text keys that map a lesion mask onto level-0 pixels.
MASK_DOWNSAMPLE_KEY, MASK_LEVEL0_KEY = "fullslide:mask_downsample", "fullslide:level0_size"
_STRIP_PX, _COLUMN_BLOCK_PX = 256, 4096


@dataclasses.dataclass(frozen=True)
class SynthSlide:
    """One slide to generate."""

    slide_id: str
    patient_id: str
    label: int
    seed: int
    appearance: Appearance
    lesion_fraction: float
    site: str = ""


def site_stains(seed: int, site: int, shift: float) -> tuple[tuple[float, ...], tuple[float, ...], float, float]:
    """(H vector, E vector, H strength, E strength) of ``site`` (0 is the reference: Ruifrok & Johnston's vectors).

    Each vector turns by ``shift`` radians towards a random direction (kept non-negative, unit length); the
    strengths scale by ``1 + shift * u``, ``u`` in [-1, 1]."""
    from fullslide.slides.synth_render import E_OD, H_OD

    if site == 0 or shift == 0:
        return tuple(map(float, H_OD)), tuple(map(float, E_OD)), 1.0, 1.0
    rng = np.random.default_rng([seed, 3, site])
    vectors = []
    for v in (H_OD.astype(np.float64), E_OD.astype(np.float64)):
        v = v / np.linalg.norm(v)
        d = rng.normal(size=3)
        d -= d.dot(v) * v  # a direction orthogonal to v
        turned = np.abs(math.cos(shift) * v + math.sin(shift) * d / np.linalg.norm(d))
        vectors.append(tuple(float(x) for x in turned / np.linalg.norm(turned)))
    h, e = 1.0 + shift * rng.uniform(-1, 1, size=2)
    return vectors[0], vectors[1], float(h), float(e)


def plan_cohort(
    n_slides: int, *, signal: Signal, lesion_fraction: float, positive_fraction: float, seed: int, diffuse_strength: float,
    stain_variation: float = 0.12, lesion_contrast: float = 1.0, sites: int = 1, site_shift: float = 0.0,
    site_confounding: float = 0.0,
) -> list[SynthSlide]:
    """Patients, labels, seeds and stains of a cohort; every third patient has two slides; patient ``p`` comes
    from site ``p % sites``, except that with ``site_confounding`` c > 0 the patients of the sites before the last
    are dealt by label: a positive goes to the first site with probability (1 + c) / 2 and a negative to the
    second with the same probability (site and label correlate there, as in multi-site cohorts with
    site-specific case mixes); the last site keeps its patients, independent of the label."""
    groups: list[list[int]] = []
    i = 0
    while i < n_slides:
        size = 2 if len(groups) % 3 == 0 and n_slides - i >= 2 else 1
        groups.append(list(range(i, i + size)))
        i += size
    rng = np.random.default_rng([seed, 0])
    positives = set(rng.permutation(len(groups))[: round(positive_fraction * len(groups))].tolist())
    slides = []
    for p, members in enumerate(groups):
        stain = np.random.default_rng([seed, 1, p]).uniform(1 - stain_variation, 1 + stain_variation, size=2)  # per patient
        label = int(p in positives)
        site = p % sites
        if site_confounding > 0 and sites > 2 and site < sites - 1:
            biased = np.random.default_rng([seed, 4, p]).random() < (1 + site_confounding) / 2
            site = (0 if biased else 1) if label else (1 if biased else 0)
        h_od, e_od, h_site, e_site = site_stains(seed, site, site_shift)
        for s in members:
            look = Appearance(h_scale=float(stain[0]) * h_site, e_scale=float(stain[1]) * e_site,
                              h_od=h_od if sites > 1 else None, e_od=e_od if sites > 1 else None,
                              diffuse=diffuse_strength if (label and signal == "diffuse") else 0.0)
            if lesion_contrast != 1.0:
                look = look.subtle(lesion_contrast)
            slides.append(SynthSlide(
                slide_id=f"synth_{s:04d}", patient_id=f"patient_{p:04d}", label=label,
                seed=int(np.random.SeedSequence([seed, 2, s]).generate_state(1)[0]), appearance=look,
                lesion_fraction=lesion_fraction if (label and signal == "focal") else 0.0,
                site=chr(ord("A") + site) if sites > 1 else "",
            ))
    return slides


def make_cohort(
    out_dir: str | Path,
    n_slides: int,
    *,
    signal: Signal = "focal",
    size: tuple[int, int] = (4096, 4096),
    mpp: float = 0.5,
    lesion_fraction: float = 0.03,
    positive_fraction: float = 0.5,
    seed: int = 0,
    tissue_fraction: float = 0.35,
    diffuse_strength: float = 1.0,
    stain_variation: float = 0.12,
    lesion_contrast: float = 1.0,
    sites: int = 1,
    site_shift: float = 0.0,
    site_confounding: float = 0.0,
    workers: int = 1,
) -> Path:
    """Write a synthetic cohort into ``out_dir`` and return the labels CSV path."""
    width, height = (int(v) for v in size)
    if n_slides < 1:
        raise ConfigError(f"synth: number of slides must be >= 1, got {n_slides}")
    if signal not in ("focal", "diffuse"):
        raise ConfigError(f"synth: signal must be 'focal' or 'diffuse', got {signal!r}")
    if min(width, height) < 256 or max(width, height) > 200_000:
        raise ConfigError(f"synth: size must be between 256 and 200000 px a side, got {width}x{height}")
    if not (0 < lesion_fraction <= 0.5):
        raise ConfigError(f"synth: lesion fraction must be in (0, 0.5], got {lesion_fraction}")
    if not (0 <= positive_fraction <= 1):
        raise ConfigError(f"synth: positive fraction must be in [0, 1], got {positive_fraction}")
    if not (0 < tissue_fraction < 1) or not (mpp > 0 and math.isfinite(mpp)):
        raise ConfigError(f"synth: need 0 < tissue fraction < 1 and mpp > 0, got {tissue_fraction}, {mpp}")
    if not 0 < lesion_contrast <= 1:
        raise ConfigError(f"synth: lesion contrast must be in (0, 1], got {lesion_contrast}")
    out = Path(out_dir)
    for sub in ("slides", "lesions"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if not 0 <= stain_variation < 1:
        raise ConfigError(f"synth: stain variation must be in [0, 1), got {stain_variation}")
    if not 1 <= sites <= 26 or not 0 <= site_shift < 1.5 or not 0 <= site_confounding <= 1:
        raise ConfigError(f"synth: need 1 <= sites <= 26, 0 <= site shift < 1.5 and 0 <= site confounding <= 1, got "
                          f"{sites}, {site_shift}, {site_confounding}")
    plan = plan_cohort(n_slides, signal=signal, lesion_fraction=lesion_fraction, positive_fraction=positive_fraction,
                       seed=seed, diffuse_strength=diffuse_strength, stain_variation=stain_variation,
                       lesion_contrast=lesion_contrast, sites=sites, site_shift=site_shift,
                       site_confounding=site_confounding)
    args = [(out, s, (width, height), mpp, tissue_fraction) for s in plan]
    if workers > 1 and n_slides > 1:
        import multiprocessing

        with ProcessPoolExecutor(min(workers, n_slides), mp_context=multiprocessing.get_context("spawn")) as pool:
            masks = list(pool.map(_make_one, args))
    else:
        masks = [_make_one(a, workers=workers) for a in args]
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + (("site",) if sites > 1 else ()))
    for s, mask in zip(plan, masks):
        writer.writerow([s.slide_id, f"slides/{s.slide_id}.tiff", s.label, s.patient_id, signal, mask or ""]
                        + ([s.site] if sites > 1 else []))
    csv_path = out / LABELS_CSV
    with atomic_path(csv_path) as tmp:
        tmp.write_text(rows.getvalue(), encoding="utf-8")
    return csv_path


def _make_one(args: tuple[Path, SynthSlide, tuple[int, int], float, float], workers: int = 1) -> str | None:
    """Generate one slide (and its lesion mask); return the mask path relative to ``out``."""
    out, slide, size, mpp, tissue_fraction = args
    layout = make_layout(size[0], size[1], mpp, slide.seed, tissue_fraction=tissue_fraction,
                         lesion_fraction=slide.lesion_fraction, appearance=slide.appearance)
    write_slide(out / "slides" / f"{slide.slide_id}.tiff", layout, workers=workers,
                description=f"fullslide synthetic slide {slide.slide_id} (patient {slide.patient_id}, label {slide.label})")
    if slide.lesion_fraction <= 0:
        return None
    relative = f"lesions/{slide.slide_id}.png"
    save_lesion_mask(out / relative, layout)
    return relative


def write_slide(path: str | Path, layout: SlideLayout, *, workers: int = 1, description: str | None = None) -> Path:
    """Render ``layout`` strip by strip into a pyramidal TIFF at ``path`` (atomically)."""
    from fullslide.slides.pyramid_writer import TILE_PX, write_pyramidal_tiff

    path = Path(path)
    with atomic_path(path) as tmp:
        write_pyramidal_tiff(tmp, (layout.width, layout.height), _strips(layout, workers), mpp=layout.mpp,
                             tile_px=TILE_PX, description=description)
    return path


def render_strip(layout: SlideLayout, y0: int) -> np.ndarray:
    """Level-0 rows [y0, y0 + 256) of the slide, rendered in column blocks to bound temporaries."""
    rows = min(_STRIP_PX, layout.height - y0)
    blocks = [render_region(layout, x, y0, min(_COLUMN_BLOCK_PX, layout.width - x), rows)
              for x in range(0, layout.width, _COLUMN_BLOCK_PX)]
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)


def _strips(layout: SlideLayout, workers: int) -> Iterator[np.ndarray]:
    """The strips in order; with ``workers`` > 1, rendered ahead by a few processes (bounded)."""
    starts = range(0, layout.height, _STRIP_PX)
    if workers <= 1:
        for y0 in starts:
            yield render_strip(layout, y0)
        return
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_set_worker_layout, initargs=(layout,)) as pool:
        pending: list[Future[np.ndarray]] = []
        queue = iter(starts)
        for y0 in queue:
            pending.append(pool.submit(_worker_strip, y0))
            if len(pending) >= 2 * workers:  # at most 2 strips per worker in flight
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


_WORKER_LAYOUT: SlideLayout | None = None


def _set_worker_layout(layout: SlideLayout) -> None:
    global _WORKER_LAYOUT
    _WORKER_LAYOUT = layout


def _worker_strip(y0: int) -> np.ndarray:
    assert _WORKER_LAYOUT is not None
    return render_strip(_WORKER_LAYOUT, y0)


# ---- lesion ground truth -----------------------------------------------------------------------
def save_lesion_mask(path: str | Path, layout: SlideLayout) -> Path:
    """Save the lesion mask as a 0/255 PNG whose text records level-0 px per mask px."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(MASK_DOWNSAMPLE_KEY, str(layout.layout_ds))
    info.add_text(MASK_LEVEL0_KEY, f"{layout.width} {layout.height}")
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(layout.lesion_mask.astype(np.uint8) * 255).save(tmp, format="PNG", pnginfo=info)
    return path


def load_lesion_mask(path: str | Path) -> tuple[np.ndarray, int]:
    """(bool mask, level-0 px per mask px) from a PNG written by ``save_lesion_mask``."""
    from PIL import Image

    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}))
        if MASK_DOWNSAMPLE_KEY not in text:
            raise ValueError(f"{path}: no '{MASK_DOWNSAMPLE_KEY}' entry; not a fullslide lesion mask")
        return np.asarray(image.convert("L")) > 127, int(text[MASK_DOWNSAMPLE_KEY])


def lesion_fraction(
    mask_path_or_array: str | Path | np.ndarray,
    coords: np.ndarray,
    level0_px: float,
    *,
    mask_downsample: float | None = None,
) -> np.ndarray:
    """Fraction of each tile (level-0 origin ``coords`` [N, 2], side ``level0_px``) covered by
    lesion, float64 [N]. An array mask needs ``mask_downsample`` (level-0 px per mask px)."""
    if isinstance(mask_path_or_array, (str, Path)):
        mask, stored = load_lesion_mask(mask_path_or_array)
        mask_downsample = mask_downsample or stored
    else:
        mask = np.asarray(mask_path_or_array, dtype=bool)
        if mask_downsample is None:
            raise ValueError("lesion_fraction: an array mask needs mask_downsample")
    return box_coverage(mask, coords, level0_px, mask_downsample)
