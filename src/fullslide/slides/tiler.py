"""Tiling: tissue mask -> grid at the target mpp -> coords HDF5 + preview PNG, for many slides.

Each slide is independent: its failure is one line in the results and never stops the others.
Outputs are written atomically (the HDF5 last, so it marks a finished slide), and a slide whose
HDF5 carries the same parameter fingerprint is skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Literal

import numpy as np

from fullslide.atomic import atomic_path
from fullslide.errors import FullslideError, SlideError
from fullslide.slides.base import resize_rgb
from fullslide.slides.grid import DEFAULT_MATCH_TOLERANCE, box_coverage, grid_level0_xy, plan_tile_geometry
from fullslide.slides.inputs import SlideJob, collect_jobs
from fullslide.slides.tissue import TissueParams, tissue_mask

log = logging.getLogger(__name__)

Status = Literal["ok", "empty", "skipped", "failed"]
PATCHES, THUMBNAILS, SUMMARY = "patches", "thumbnails", "tiling_summary.csv"
#: The tissue mask's resolution (micrometres per mask pixel), the same whatever the tile size, so the tissue
#: kept does not depend on it; coarser only where the mask's longest side would exceed ``_MASK_MAX_PX``.
MASK_MPP, _MASK_MAX_PX = 4.0, 4096
#: Tiles read back after tiling to catch corrupt pixel data early.
_PROBE_TILES = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class TilingParams:
    """What defines a tiling; its fingerprint decides whether an existing output is reused."""

    target_mpp: float = 0.5
    """Micrometres per pixel of the output tiles."""
    tile_px: int = 224
    """Tile side in target pixels."""
    tissue_threshold: float = 0.5
    """Minimal tissue fraction of a tile for it to be kept (0 < t <= 1)."""
    match_tolerance: float = DEFAULT_MATCH_TOLERANCE
    """A pyramid level within this relative mpp difference is read without resampling."""
    tissue: TissueParams = dataclasses.field(default_factory=TissueParams)
    """Tissue-mask settings."""
    thumbnail_px: int = 1024
    """Longest side of the preview PNG."""

    def __post_init__(self) -> None:
        if not (self.target_mpp > 0 and math.isfinite(self.target_mpp)):
            raise FullslideError(f"target mpp must be a positive number, got {self.target_mpp}")
        if self.tile_px < 1:
            raise FullslideError(f"tile size must be >= 1 px, got {self.tile_px}")
        if not 0 < self.tissue_threshold <= 1:
            raise FullslideError(f"tissue threshold must be in (0, 1], got {self.tissue_threshold}")

    def fingerprint(self, job: SlideJob, slide_stat: tuple[int, int]) -> str:
        """Hash of everything the coords depend on: parameters, mpp override, slide size and mtime."""
        payload = {
            "v": 2,  # 2: tissue mask at a fixed resolution (MASK_MPP), artefacts as regions
            "target_mpp": self.target_mpp,
            "tile_px": self.tile_px,
            "tissue_threshold": self.tissue_threshold,
            "match_tolerance": self.match_tolerance,
            "tissue": dataclasses.asdict(self.tissue),
            "mpp": job.mpp,
            "slide": list(slide_stat),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileResult:
    """Outcome of one slide; ``message`` is the one-line error or warning, if any."""

    slide_id: str
    path: Path
    status: Status
    n_tiles: int = 0
    mpp: float | None = None
    seconds: float = 0.0
    message: str = ""
    h5_path: Path | None = None
    thumbnail_path: Path | None = None
    backend: str = ""

    @property
    def failed(self) -> bool:
        """True when the slide could not be tiled."""
        return self.status == "failed"


def output_paths(out_dir: Path, slide_id: str) -> tuple[Path, Path]:
    """(coords HDF5, preview PNG) of a slide in an output folder."""
    return out_dir / PATCHES / f"{slide_id}.h5", out_dir / THUMBNAILS / f"{slide_id}.png"


def tile_slide(job: SlideJob, out_dir: Path, params: TilingParams, *, backend: str = "auto", overwrite: bool = False) -> TileResult:
    """Tile one slide; every error becomes a failed result naming the file and the cause."""
    start = time.perf_counter()
    try:
        return _tile_slide(job, Path(out_dir), params, backend, overwrite, start)
    except FullslideError as exc:
        message = str(exc) if str(job.path) in str(exc) else f"{job.path}: {exc}"
    except Exception as exc:  # a bug or library failure on one slide must not stop the batch
        log.debug("unexpected error on %s", job.path, exc_info=True)
        message = f"{job.path}: {type(exc).__name__}: {' '.join(str(exc).split())}"
    return TileResult(slide_id=job.slide_id, path=job.path, status="failed", message=message, seconds=time.perf_counter() - start)


def _tile_slide(job: SlideJob, out_dir: Path, params: TilingParams, backend: str, overwrite: bool, start: float) -> TileResult:
    from fullslide.slides.coords_io import read_coords_attrs, write_coords
    from fullslide.slides.dicom import slide_stat
    from fullslide.slides.open import open_slide
    from fullslide.slides.overlay import draw_overlay

    h5_path, png_path = output_paths(out_dir, job.slide_id)
    try:
        stat = slide_stat(job.path)
    except FileNotFoundError:
        raise SlideError(job.path, "file not found") from None
    except OSError as exc:  # a symlink loop, a permission problem on a folder above
        raise SlideError(job.path, f"cannot open ({exc.strerror or exc})") from None
    fingerprint = params.fingerprint(job, stat)
    if not overwrite and h5_path.is_file() and png_path.is_file():
        try:
            attrs = read_coords_attrs(h5_path)
        except SlideError as exc:
            log.warning("re-tiling: %s", exc)
        else:
            if attrs.get("fingerprint") == fingerprint:
                return TileResult(
                    slide_id=job.slide_id, path=job.path, status="skipped", n_tiles=int(attrs.get("num_tiles", 0)),
                    mpp=float(attrs["slide_mpp"]), seconds=time.perf_counter() - start, h5_path=h5_path,
                    thumbnail_path=png_path, backend=str(attrs["backend"]),
                )
    with open_slide(job.path, backend=backend, mpp=job.mpp) as slide:
        slide_mpp = slide.require_mpp()
        geometry = plan_tile_geometry(slide_mpp, slide.level_downsamples, params.target_mpp, params.tile_px, params.match_tolerance)
        width, height = slide.dimensions
        mask_ds = max(1.0, MASK_MPP / slide_mpp, max(width, height) / _MASK_MAX_PX)
        mask_px = math.ceil(max(width, height) / mask_ds)
        # one read serves both the mask and the preview (a second full decode costs as much as the first)
        image = slide.thumbnail(max(mask_px, min(params.thumbnail_px, max(width, height))),
                                progress=_ReadProgress(job.path))
        thumb = image if max(image.shape[:2]) == mask_px else _shrink(image, mask_px)
        scale = (width / thumb.shape[1], height / thumb.shape[0])
        mask = tissue_mask(thumb, slide_mpp * (scale[0] + scale[1]) / 2, params.tissue)
        grid = grid_level0_xy((width, height), geometry.level0_px)
        fraction = box_coverage(mask, grid, geometry.level0_px, scale)
        coords = grid[fraction >= params.tissue_threshold - 1e-9]
        if coords.shape[0]:
            probe = coords[np.linspace(0, coords.shape[0] - 1, min(_PROBE_TILES, coords.shape[0])).astype(int)]
            slide.read_tiles(probe, geometry)  # raises SlideError on unreadable pixel data
        preview = _shrink(image, params.thumbnail_px)
        overlay = draw_overlay(preview, mask, coords, geometry.level0_px, (width, height))
        _write_png(png_path, overlay)
        warnings = []
        if geometry.level_mpp > params.target_mpp * (1 + params.match_tolerance):
            warnings.append(f"slide mpp {slide_mpp:g} is coarser than the target {params.target_mpp:g}: tiles are upsampled")
        if coords.shape[0] == 0:
            warnings.append("no tissue found: 0 tiles")
        write_coords(
            h5_path, coords, geometry, slide_id=job.slide_id, level0_wh=(width, height),
            level_wh=slide.level_dimensions[geometry.level], backend=slide.backend, fingerprint=fingerprint,
            extra_attrs={"num_tiles": int(coords.shape[0]), "tissue_threshold": params.tissue_threshold,
                         "slide_path": str(job.path), "vendor": slide.vendor, "mpp_source": slide.mpp_source,
                         "slide_bytes": stat[0]},
        )
        return TileResult(
            slide_id=job.slide_id, path=job.path, status="ok" if coords.shape[0] else "empty",
            n_tiles=int(coords.shape[0]), mpp=slide_mpp, seconds=time.perf_counter() - start,
            message="; ".join(f"{job.path}: {w}" for w in warnings), h5_path=h5_path, thumbnail_path=png_path,
            backend=slide.backend,
        )


class _ReadProgress:
    """Reports a long whole-slide read (a slide without a pyramid) on stderr every ``every_s`` seconds."""

    def __init__(self, path: Path, every_s: float = 10.0) -> None:
        self.path, self.every_s = path, every_s
        self.start = self.last = time.monotonic()

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(f"{self.path}: reading for tissue detection, {100 * fraction:.0f}% after {now - self.start:.0f} s "
                  "(no pyramid level to read from)", file=sys.stderr, flush=True)


def _shrink(rgb: np.ndarray, max_px: int) -> np.ndarray:
    """``rgb`` resized (antialiased) so that its longest side is at most ``max_px``."""
    longest = max(rgb.shape[:2])
    if longest <= max_px:
        return rgb
    scale = max_px / longest
    return resize_rgb(rgb, (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale))))


def _write_png(path: Path, rgb: np.ndarray) -> None:
    """Save an RGB PNG atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def check_writable(out_dir: Path) -> None:
    """Create the output folders and prove they accept files; FullslideError naming the folder if not."""
    try:
        for sub in (PATCHES, THUMBNAILS):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir / PATCHES, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise FullslideError(f"{out_dir}: output folder is not writable ({exc.strerror or exc})") from exc


def tile_slides(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    target_mpp: float = 0.5,
    tile_px: int = 224,
    tissue_threshold: float = 0.5,
    workers: int = 1,
    backend: str = "auto",
    mpp: float | None = None,
    match_tolerance: float = DEFAULT_MATCH_TOLERANCE,
    tissue: TissueParams | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> list[TileResult]:
    """Tile slides (paths, folders, CSVs with a ``path`` column) into ``out_dir``; one result each.

    Writes ``patches/{slide_id}.h5``, ``thumbnails/{slide_id}.png`` and ``tiling_summary.csv``.
    Raises FullslideError only for problems that concern every slide (unwritable output folder,
    bad parameters); per-slide problems are failed results.
    """
    params = TilingParams(
        target_mpp=target_mpp, tile_px=tile_px, tissue_threshold=tissue_threshold,
        match_tolerance=match_tolerance, tissue=tissue or TissueParams(),
    )
    out = Path(out_dir)
    check_writable(out)
    if isinstance(inputs, (str, Path)):  # one path, not an iterable of characters
        inputs = [inputs]
    jobs, input_errors = collect_jobs(inputs, mpp=mpp)
    results: dict[int, TileResult] = {}
    bar = _progress_bar(len(jobs), progress)
    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            results[i] = tile_slide(job, out, params, backend=backend, overwrite=overwrite)
            bar.update(1)
    else:
        import multiprocessing

        # spawn: no fork of a parent that may hold threads or a CUDA context (the training app)
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures: dict[Future[TileResult], int] = {
                pool.submit(tile_slide, job, out, params, backend=backend, overwrite=overwrite): i for i, job in enumerate(jobs)
            }
            for future in as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                except Exception as exc:  # the worker process died (e.g. a crash inside a C library)
                    job = jobs[i]
                    results[i] = TileResult(slide_id=job.slide_id, path=job.path, status="failed",
                                            message=f"{job.path}: worker process failed ({type(exc).__name__}: {exc})")
                bar.update(1)
    bar.close()
    ordered = [
        TileResult(slide_id=e.path.stem, path=e.path, status="failed", message=e.message) for e in input_errors
    ] + [results[i] for i in range(len(jobs))]
    write_summary(out / SUMMARY, ordered)
    return ordered


def _progress_bar(total: int, enabled: bool):  # type: ignore[no-untyped-def]
    """A tqdm bar on stderr (a no-op object when disabled)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="slide", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def write_summary(path: Path, results: list[TileResult]) -> None:
    """Write the per-slide summary CSV atomically."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["slide_id", "path", "status", "tiles", "mpp", "seconds", "backend", "message"])
    for r in results:
        writer.writerow([r.slide_id, r.path, r.status, r.n_tiles, "" if r.mpp is None else f"{r.mpp:g}",
                         f"{r.seconds:.2f}", r.backend, r.message])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
