"""Tile-reading throughput: fullslide's ``Slide.read_tiles`` beside raw ``openslide.OpenSlide.read_region``.

Reads 224 px tiles at 0.5 mpp from a synthetic pyramidal TIFF (generated once, cached) and from the
vendored real SVS, with 1 and 2 worker processes, each method on the same coordinates in the same
run. Raw OpenSlide returns a PIL RGBA image and stops there; "openslide+np.asarray" adds the usual
``np.asarray(image.convert("RGB"))``; fullslide returns uint8 RGB arrays (alpha checked, white
outside the slide) through its OpenSlide, tiffslide and (when installed) fastslide backends; "raw-fastslide"
is fastslide's own ``read_region(...).numpy()``. Before timing, each fullslide backend's tiles are compared
with OpenSlide's on the same coordinates (max and mean absolute difference in grey levels).

    python benchmarks/bench_read.py                      # defaults: 16384 px synthetic slide, 3 repeats
    python benchmarks/bench_read.py --synth-size 8192 --tiles 1000 --repeats 5 --json out.json

Each figure is the median over repeats of tiles / (slowest worker's time); methods are interleaved
within each repeat, and every measurement opens a fresh slide handle (cold tile cache).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REAL_SVS = Path(__file__).resolve().parents[1] / "tests" / "data" / "cmu_small_region.svs"
METHODS: tuple[str, ...] = ("raw-openslide", "openslide+np.asarray", "fullslide-openslide", "fullslide-tiffslide")
if importlib.util.find_spec("fastslide") is not None:
    METHODS += ("raw-fastslide", "fullslide-fastslide")


def _wait_until(start_at: float) -> None:
    """Sleep until the wall-clock time at which every worker starts reading together."""
    time.sleep(max(0.0, start_at - time.time()))


def _read(method: str, path: str, coords: np.ndarray, level: int, read_px: int, tile_px: int, start_at: float) -> float:
    """Read all ``coords`` with one method in this process; return the seconds it took."""
    if method in ("raw-openslide", "openslide+np.asarray"):
        import openslide

        slide = openslide.OpenSlide(path)
        to_array = method != "raw-openslide"
        _wait_until(start_at)
        start = time.perf_counter()
        for x, y in coords.tolist():
            image = slide.read_region((x, y), level, (read_px, read_px))
            if to_array:  # what pipelines usually do to get an RGB array (CLAM, TRIDENT style)
                np.asarray(image.convert("RGB"))
        elapsed = time.perf_counter() - start
        slide.close()
        return elapsed
    if method == "raw-fastslide":
        import fastslide

        slide = fastslide.FastSlide.from_file_path(path)
        _wait_until(start_at)
        start = time.perf_counter()
        for x, y in coords.tolist():
            nx, ny = slide.convert_level0_to_level_native(x, y, level)
            slide.read_region((nx, ny), level, (read_px, read_px)).numpy()
        elapsed = time.perf_counter() - start
        slide.close()
        return elapsed
    from fullslide.slides import TileGeometry, open_slide

    backend = method.split("-", 1)[1]
    with open_slide(path, backend=backend) as slide:
        mpp = slide.require_mpp()
        geometry = TileGeometry(target_mpp=mpp * read_px / tile_px, tile_px=tile_px, slide_mpp=mpp, level=level,
                                level_downsample=slide.level_downsamples[level], read_px=read_px,
                                level0_px=round(read_px * slide.level_downsamples[level]))
        out = np.empty((64, tile_px, tile_px, 3), dtype=np.uint8)
        _wait_until(start_at)
        start = time.perf_counter()
        for i in range(0, len(coords), 64):
            batch = coords[i : i + 64]
            slide.read_tiles(batch, geometry, out=out[: len(batch)])
        return time.perf_counter() - start


def _warm() -> int:
    """Import the libraries in a worker before anything is timed."""
    for module in ("openslide", "fullslide.slides.openslide_backend", "fullslide.slides.tiffslide_backend"):
        importlib.import_module(module)
    if "raw-fastslide" in METHODS:
        importlib.import_module("fastslide")
    return os.getpid()


def pixel_differences(name: str, path: Path, coords: np.ndarray, level: int, read_px: int) -> list[dict]:
    """Each fullslide backend's regions against OpenSlide's on the first 200 coordinates."""
    from fullslide.slides import open_slide

    coords = coords[:200]
    with open_slide(path, backend="openslide") as ref:
        want = np.stack([ref.read_region(tuple(xy), level, (read_px, read_px)) for xy in coords.tolist()]).astype(np.int16)
    rows = []
    for method in METHODS:
        if not method.startswith("fullslide-") or method == "fullslide-openslide":
            continue
        with open_slide(path, backend=method.split("-", 1)[1]) as slide:
            got = np.stack([slide.read_region(tuple(xy), level, (read_px, read_px)) for xy in coords.tolist()])
        diff = np.abs(got.astype(np.int16) - want)
        rows.append({"slide": name, "method": method, "tiles": len(coords), "max_abs_diff": int(diff.max()),
                     "mean_abs_diff": float(diff.mean()), "identical_tiles": int((diff.reshape(len(coords), -1).max(1) == 0).sum())})
    return rows


def measure(pool: ProcessPoolExecutor, workers: int, method: str, path: Path, coords: np.ndarray,
            level: int, read_px: int, tile_px: int) -> float:
    """Tiles per second of ``method`` with ``workers`` processes sharing the coordinates."""
    shares = np.array_split(coords, workers)
    start_at = time.time() + 0.3  # every worker has opened its slide by then
    futures = [pool.submit(_read, method, str(path), share, level, read_px, tile_px, start_at) for share in shares]
    slowest = max(f.result() for f in futures)
    return len(coords) / slowest


def bench_slide(name: str, path: Path, coords: np.ndarray, level: int, read_px: int, tile_px: int,
                repeats: int) -> list[dict]:
    """Pixel differences, then all methods x {1, 2} workers on one slide."""
    rows = pixel_differences(name, path, coords, level, read_px)
    for workers in (1, 2):
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for future in [pool.submit(_warm) for _ in range(workers)]:
                future.result()
            samples: dict[str, list[float]] = {m: [] for m in METHODS}
            for repeat in range(repeats):
                order = METHODS if repeat % 2 == 0 else METHODS[::-1]
                for method in order:
                    samples[method].append(measure(pool, workers, method, path, coords, level, read_px, tile_px))
        raw = statistics.median(samples["raw-openslide"])
        for method in METHODS:
            rate = statistics.median(samples[method])
            rows.append({"slide": name, "workers": workers, "method": method, "tiles": len(coords), "tiles_per_s": rate,
                         "tiles_per_s_per_worker": rate / workers, "ratio_vs_raw": rate / raw,
                         "samples": [round(s, 1) for s in samples[method]]})
    return rows


def synthetic_slide(work: Path, size: int) -> Path:
    """A cached synthetic slide of ``size`` x ``size`` px at 0.5 mpp."""
    from fullslide.slides.synth import write_slide
    from fullslide.slides.synth_render import make_layout

    path = work / f"synth_{size}.tiff"
    if not path.is_file():
        start = time.perf_counter()
        write_slide(path, make_layout(size, size, 0.5, seed=0, tissue_fraction=0.45), workers=os.cpu_count() or 1)
        print(f"generated {path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synth-size", type=int, default=16384, help="side of the synthetic slide in px (16384)")
    parser.add_argument("--tiles", type=int, default=1500, help="tiles read per measurement (1500)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per method (3)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "fullslide_bench")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--only", choices=("synthetic", "real"), default=None, help="benchmark one slide only")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    if args.only != "real":
        rows += bench_synthetic(args, np.random.default_rng(0))
    if args.only != "synthetic":
        rows += bench_real(args, np.random.default_rng(1))
    report(rows, args.json)


def bench_synthetic(args: argparse.Namespace, rng: np.random.Generator) -> list[dict]:
    """The synthetic slide: tissue tiles of the tiler's grid, shuffled."""
    from fullslide.slides import read_coords, tile_slides

    synth = synthetic_slide(args.work, args.synth_size)
    (result,) = tile_slides([synth], args.work / "tiles", target_mpp=0.5, tile_px=224)
    coords, geometry = read_coords(result.h5_path)
    coords = coords[rng.permutation(len(coords))[: args.tiles]]
    print(f"synthetic: {len(coords)} tissue tiles at level {geometry.level}, read {geometry.read_px} px", file=sys.stderr)
    return bench_slide(f"synthetic {args.synth_size}px", synth, coords, geometry.level, geometry.read_px, 224, args.repeats)


def bench_real(args: argparse.Namespace, rng: np.random.Generator) -> list[dict]:
    """The vendored SVS."""
    from fullslide.slides import open_slide

    # the real SVS holds only ~40 tissue tiles on a grid: read random positions over the whole slide instead
    real = open_slide(REAL_SVS)
    w, h = real.dimensions
    real_coords = np.stack([rng.integers(0, w - 224, args.tiles), rng.integers(0, h - 224, args.tiles)], axis=1)
    return bench_slide("real SVS (CMU)", REAL_SVS, real_coords, 0, 224, 224, args.repeats)


def report(rows: list[dict], json_path: Path | None) -> None:
    """Print the table (and write JSON)."""
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    for r in (r for r in rows if "max_abs_diff" in r):
        print(f"{r['slide']:<20} {r['method']:<20} vs OpenSlide on {r['tiles']} tiles: max |diff| {r['max_abs_diff']}, "
              f"mean {r['mean_abs_diff']:.3f}, identical tiles {r['identical_tiles']}")
    print(f"{'slide':<20} {'workers':>7} {'method':<20} {'tiles/s':>9} {'per worker':>10} {'vs raw':>7}")
    for r in (r for r in rows if "tiles_per_s" in r):
        print(f"{r['slide']:<20} {r['workers']:>7} {r['method']:<20} {r['tiles_per_s']:>9.0f} "
              f"{r['tiles_per_s_per_worker']:>10.0f} {r['ratio_vs_raw']:>7.2f}")
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
