"""Subcommands of the slide I/O layer: ``info``, ``tile`` and ``synth``.

Each is a thin call into ``fullslide.slides``; slide libraries are imported inside the command
functions so that ``fullslide --help`` stays fast. Per-slide problems are printed as one line
naming the file and the cause; the exit code is 1 when any slide failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fullslide.slides.base import Slide


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(" ", "").split("x")
    try:
        width, height = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        width = height = 0
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels (or one number), got {text!r}")
    return width, height


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Attach ``info``, ``tile`` and ``synth``."""
    from fullslide.slides.open import BACKEND_CHOICES

    p = sub.add_parser("info", help="print vendor, backend, levels, mpp and size of slides",
                       description="Describe each slide, or say in one line why it cannot be opened.")
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="slide library (default: auto)")
    p.add_argument("--mpp", type=_positive_float, default=None, help="mpp to report for files without it")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tile", help="detect tissue and write tile coordinates (HDF5) for slides",
                       description="Tissue mask -> grid of tiles at --target-mpp -> OUT/patches/{slide}.h5 (CLAM/TRIDENT "
                       "layout), OUT/thumbnails/{slide}.png and OUT/tiling_summary.csv. Slides already tiled with the "
                       "same parameters are skipped; outputs are written atomically.")
    p.add_argument("inputs", nargs="+", metavar="SLIDES_OR_CSV",
                   help="slide files, folders (scanned recursively) or CSV files with a 'path' column "
                   "(optional 'slide_id', 'mpp'; relative paths resolve against the CSV's folder)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--target-mpp", type=_positive_float, default=0.5, help="micrometres per pixel of the tiles (0.5)")
    p.add_argument("--tile-px", type=_positive_int, default=224, help="tile side in pixels at the target mpp (224)")
    p.add_argument("--tissue-threshold", type=float, default=0.5, help="minimal tissue fraction of a kept tile (0.5)")
    p.add_argument("--workers", type=_positive_int, default=1, help="slides processed in parallel (processes)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="slide library (default: auto)")
    p.add_argument("--mpp", type=_positive_float, default=None,
                   help="mpp of the slides, overriding their metadata (needed for plain images); a CSV 'mpp' cell wins")
    p.add_argument("--overwrite", action="store_true", help="re-tile slides even when their output is up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tile)

    p = sub.add_parser("cohort", help="build the cohort CSV of a public dataset (camelyon16, tcga, panda) from its folder",
                       description="Write the cohort CSV `train` reads from a dataset's published folder layout and "
                       "label files (README: cohort recipes; examples/configs/ has a config for each).")
    p.add_argument("dataset", choices=("camelyon16", "tcga", "panda"), help="which dataset's layout ROOT follows")
    p.add_argument("root", type=Path, help="the dataset's folder as downloaded")
    p.add_argument("--out", type=Path, required=True, help="cohort CSV to write (paths relative to it)")
    p.add_argument("--labels", type=Path, default=None,
                   help="tcga: a table keyed by patient (patient_id, case_submitter_id, ...) or slide_id")
    p.add_argument("--label-column", default="label", help="tcga: the column of --labels to use (label)")
    p.add_argument("--all-sections", action="store_true", help="tcga: keep frozen (TS/BS) sections too")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="camelyon16: share of the training slides dealt to val, stratified (0.15)")
    p.add_argument("--seed", type=int, default=0, help="camelyon16: seed of the train/val deal (0)")
    p.add_argument("--skip-missing", action="store_true",
                   help="camelyon16, panda: leave out listed slides whose file is missing (warned), instead of failing")
    p.set_defaults(func=cmd_cohort)

    p = sub.add_parser("synth", help="write a synthetic H&E-like cohort (pyramidal TIFFs + labels CSV)",
                       description="Procedural slides with a known signal: 'focal' (small lesion foci in positive slides, "
                       "ground-truth masks saved) or 'diffuse' (a subtle shift over all tissue of positive slides).")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--slides", type=_positive_int, default=8, help="number of slides (8)")
    p.add_argument("--signal", choices=("focal", "diffuse"), default="focal", help="signal of positive slides (focal)")
    p.add_argument("--size", type=_size, default=(4096, 4096), help="level-0 size WIDTHxHEIGHT (4096x4096; up to 100000x100000)")
    p.add_argument("--mpp", type=_positive_float, default=0.5, help="micrometres per pixel at level 0 (0.5)")
    p.add_argument("--lesion-fraction", type=float, default=0.03, help="share of tissue covered by lesions, focal (0.03)")
    p.add_argument("--positive-fraction", type=float, default=0.5, help="share of positive patients (0.5)")
    p.add_argument("--tissue-fraction", type=float, default=0.35, help="share of the slide covered by tissue (0.35)")
    p.add_argument("--stain-variation", type=float, default=0.12,
                   help="per-patient haematoxylin/eosin strength varies by up to this factor, like sites do (0.12)")
    p.add_argument("--lesion-contrast", type=float, default=1.0,
                   help="how far lesions differ from normal tissue, 0-1 (1); lower is a subtler signal")
    p.add_argument("--diffuse-strength", type=float, default=1.0, help="strength of the diffuse signal (1)")
    p.add_argument("--sites", type=_positive_int, default=1,
                   help="patients come from this many sites in turn (A, B, C...; a 'site' column names it) (1)")
    p.add_argument("--site-shift", type=float, default=0.0,
                   help="how far each site's stains differ from site A's: radians the H/E vectors turn, and the "
                        "relative change of their strengths (0; 0.3 is a strong lab-to-lab difference)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0); same seed, same cohort")
    p.add_argument("--workers", type=_positive_int, default=1, help="processes (over slides, or over strips of one slide)")
    p.set_defaults(func=cmd_synth)


def cmd_info(args: argparse.Namespace) -> int:
    """Print a description of each slide; exit 1 if any could not be opened."""
    from fullslide.errors import FullslideError
    from fullslide.slides.open import open_slide

    failed = 0
    for name in args.slides:
        try:
            with open_slide(name, backend=args.backend, mpp=args.mpp) as slide:
                print(describe(slide))
        except FullslideError as exc:
            failed += 1
            print(f"fullslide info: error: {exc}", file=sys.stderr)
    return 1 if failed else 0


def describe(slide: Slide) -> str:
    """A few lines about a slide: vendor, backend, mpp, size, levels."""
    width, height = slide.dimensions
    if slide.mpp is not None:
        mpp = f"{slide.mpp:g} ({slide.mpp_source})"
        size = f"{width} x {height} px ({width * slide.mpp / 1000:.2f} x {height * slide.mpp / 1000:.2f} mm)"
    else:
        mpp, size = "unknown (pass --mpp)", f"{width} x {height} px"
    lines = [str(slide.path), f"  vendor: {slide.vendor}  backend: {slide.backend}  mpp: {mpp}",
             f"  size: {size}  levels: {slide.level_count}"]
    if slide.vendor == "dicom":
        container = str(slide.properties.get("dicom.ContainerIdentifier") or "none")
        lines.append(f"  slide id: {slide.slide_id}  DICOM container id: {container}")
    for level, ((w, h), ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples)):
        level_mpp = f"  mpp {slide.mpp * ds:.4g}" if slide.mpp is not None else ""
        lines.append(f"    level {level}: {w} x {h}  downsample {ds:.4g}{level_mpp}")
    return "\n".join(lines)


def cmd_tile(args: argparse.Namespace) -> int:
    """Tile slides, print the summary table; exit 1 if any slide failed."""
    from fullslide.slides.tiler import SUMMARY, tile_slides

    results = tile_slides(
        args.inputs, args.out, target_mpp=args.target_mpp, tile_px=args.tile_px, tissue_threshold=args.tissue_threshold,
        workers=args.workers, backend=args.backend, mpp=args.mpp, overwrite=args.overwrite,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    rows = [(r.slide_id, str(r.n_tiles) if not r.failed else "-", f"{r.mpp:g}" if r.mpp else "-",
             f"{r.seconds:.2f}", r.status) for r in results]
    print(format_table(("slide", "tiles", "mpp", "seconds", "status"), rows))
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "empty", "skipped", "failed")}
    print(f"{len(results)} slides: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; summary in {args.out / SUMMARY}")
    for r in results:
        if r.message:
            kind = "error" if r.failed else "warning"
            print(f"fullslide tile: {kind}: {r.message}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def cmd_cohort(args: argparse.Namespace) -> int:
    from fullslide.data.cohort import CohortTable
    from fullslide.data.datasets import camelyon16, panda, tcga
    from fullslide.errors import ConfigError

    if args.dataset != "tcga" and (args.labels or args.all_sections):
        raise ConfigError(f"--labels and --all-sections are for tcga, not {args.dataset}")
    if not 0 <= args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.dataset == "camelyon16":
        out = camelyon16(args.root, args.out, val_fraction=args.val_fraction, seed=args.seed,
                         skip_missing=args.skip_missing)
    elif args.dataset == "tcga":
        out = tcga(args.root, args.out, labels=args.labels, label_column=args.label_column,
                   all_sections=args.all_sections)
    else:
        out = panda(args.root, args.out, skip_missing=args.skip_missing)
    table = CohortTable.from_csv(out, require_labels=args.dataset != "tcga" or args.labels is not None)
    print(f"{out}: {len(table)} slides of {len(table.patients())} patients")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Write a synthetic cohort and print the labels CSV path."""
    from fullslide.slides.synth import make_cohort

    csv_path = make_cohort(
        args.out, args.slides, signal=args.signal, size=args.size, mpp=args.mpp, lesion_fraction=args.lesion_fraction,
        positive_fraction=args.positive_fraction, seed=args.seed, tissue_fraction=args.tissue_fraction,
        stain_variation=args.stain_variation, lesion_contrast=args.lesion_contrast, sites=args.sites,
        site_shift=args.site_shift,
        diffuse_strength=args.diffuse_strength, workers=args.workers,
    )
    print(csv_path)
    return 0
