"""Everything a run needs before its first step: cohort, patient-level splits, tiles, model.

Used by ``train`` (which writes ``splits.csv`` and ``run.json``) and by ``eval`` / ``predict`` / ``heatmap``
(which read them back). Slides are tiled on the fly into ``RUN/tiles`` when no coords exist for them;
slides that cannot be tiled, hold no tissue, or lack features for a frozen run are left out with their
one-line reason (counted and logged), never a crash.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fullslide.atomic import atomic_path, atomic_write_text
from fullslide.data.cohort import CohortTable
from fullslide.data.loader import SlideSource
from fullslide.data.stain import StainNormalizer
from fullslide.engine import ParallelContext
from fullslide.errors import ConfigError, FullslideError, SlideError
from fullslide.train.config import Config

log = logging.getLogger("fullslide.train")

RUN_FILE = "run.json"
SPLITS_FILE = "splits.csv"
TILES_DIR = "tiles"


@dataclass
class RunData:
    """The cohort of a run, its splits and the usable slides."""

    cohort: CohortTable
    splits: dict[str, str]
    sources: dict[str, SlideSource] = field(default_factory=dict)  # usable slides by id
    excluded: dict[str, str] = field(default_factory=dict)  # slide id -> one-line reason
    feature_width: int | None = None  # frozen runs: the width of the extracted features
    stain: StainNormalizer | None = None  # data.stain_normalize, with every usable slide's fit in its source

    def split_sources(self, split: str) -> list[SlideSource]:
        return [self.sources[r.slide_id] for r in self.cohort.records
                if self.splits.get(r.slide_id) == split and r.slide_id in self.sources]


def barrier(ctx: ParallelContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()  # COLLECTIVE (world): wait for rank 0's files (tiles, splits)


def features_path(features_dir: str | Path, slide_id: str) -> Path:
    """Where ``fullslide extract`` writes a slide's features."""
    return Path(features_dir) / "features" / f"{slide_id}.h5"


def _n_rows(h5_path: Path, dataset: str) -> int:
    import h5py

    with h5py.File(h5_path, "r") as h5:
        return int(h5[dataset].shape[0])


def ensure_tiles(
    config: Config, cohort: CohortTable, run_dir: Path, ctx: ParallelContext, *, progress: bool = False
) -> tuple[dict[str, SlideSource], dict[str, str]]:
    """Coords for every slide (from ``data.coords_dir`` or tiled now into ``RUN/tiles``): (sources, excluded)."""
    from fullslide.slides import tile_slides
    from fullslide.slides.tiler import output_paths

    from fullslide.slides.coords_io import find_coords_file, is_fullslide_coords

    given = Path(config.data.coords_dir) if config.data.coords_dir else None
    if given is not None and not given.is_dir():  # never re-tile a whole cohort because of a typo
        raise ConfigError(f"data.coords_dir: {given} is not a folder (the output of `fullslide tile`); fix the path, "
                          "or set data.coords_dir: null to tile into the run folder")
    own = run_dir / TILES_DIR
    coords: dict[str, Path] = {}
    foreign: dict[str, Path] = {}  # TRIDENT / CLAM files, converted into RUN/tiles
    todo = []
    for r in cohort.records:
        found = find_coords_file(given, r.slide_id) if given is not None else None
        if found is None:
            todo.append(r)
        elif is_fullslide_coords(found):
            coords[r.slide_id] = found
        else:
            foreign[r.slide_id] = found
    if given is not None and todo:
        log.warning("%d slide(s) have no coords in %s (e.g. %s): tiling them into %s", len(todo), given,
                    todo[0].slide_id, own)
    excluded: dict[str, str] = {}
    if foreign:
        excluded.update(_import_foreign(config, cohort, foreign, own, coords, ctx))
    if todo:
        if ctx.rank == 0:
            own.mkdir(parents=True, exist_ok=True)
            job_csv = own / "to_tile.csv"
            with atomic_path(job_csv) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(["slide_id", "path", "mpp"])
                for r in todo:
                    writer.writerow([r.slide_id, str(r.path.resolve()), r.mpp or config.data.mpp or ""])
            new = sum(1 for r in todo if not output_paths(own, r.slide_id)[0].exists())
            log.info("tiles: %d slide(s) to tile, %d to check in %s", new, len(todo) - new, own)
            tile_slides([job_csv], own, target_mpp=config.data.target_mpp, tile_px=config.data.tile_px,
                        tissue_threshold=config.data.tissue_threshold, workers=max(1, config.train.loader_workers),
                        backend=config.data.backend, mpp=config.data.mpp, progress=progress)
        barrier(ctx)
        summary = _read_summary(own / "tiling_summary.csv")
        for r in todo:
            h5 = output_paths(own, r.slide_id)[0]
            if h5.exists():
                coords[r.slide_id] = h5
            else:
                excluded[r.slide_id] = summary.get(r.slide_id) or f"{r.path}: not tiled"
    sources: dict[str, SlideSource] = {}
    for r in cohort.records:
        if r.slide_id not in coords:
            continue
        try:
            n = _checked_coords(config, r.path, coords[r.slide_id], shown=foreign.get(r.slide_id))
        except ConfigError:
            raise
        except FullslideError as exc:  # bad coords, or a slide that changed since tiling: this slide only
            excluded[r.slide_id] = str(exc)
            continue
        except Exception as exc:  # a corrupt coords file: this slide only
            excluded[r.slide_id] = f"{coords[r.slide_id]}: unreadable coords ({exc})"
            continue
        if n == 0:
            excluded[r.slide_id] = f"{r.path}: no tissue tiles"
            continue
        sources[r.slide_id] = SlideSource(slide_id=r.slide_id, path=str(r.path), n_tiles=n,
                                          coords_h5=str(coords[r.slide_id]), mpp=r.mpp or config.data.mpp)
    return sources, excluded


def _import_foreign(config: Config, cohort: CohortTable, foreign: dict[str, Path], own: Path,
                    coords: dict[str, Path], ctx: ParallelContext) -> dict[str, str]:
    """Convert TRIDENT / CLAM coords files into ``RUN/tiles/patches`` (rank 0; once, unless the source changed);
    returns the slides whose file could not be used, with the one-line reason."""
    from fullslide.slides import open_slide
    from fullslide.slides.coords_io import import_coords
    from fullslide.slides.tiler import output_paths

    failed: dict[str, str] = {}
    for slide_id, src in foreign.items():
        out = output_paths(own, slide_id)[0]
        if ctx.rank == 0 and not (out.exists() and out.stat().st_mtime_ns >= src.stat().st_mtime_ns):
            try:
                with open_slide(cohort.by_id(slide_id).path, backend=config.data.backend, mpp=config.data.mpp) as slide:
                    import_coords(src, slide, out, slide_id)
            except FullslideError as exc:
                failed[slide_id] = str(exc)
                out.unlink(missing_ok=True)
    barrier(ctx)
    for slide_id in foreign:
        out = output_paths(own, slide_id)[0]
        if out.exists():
            coords[slide_id] = out
        else:
            failed.setdefault(slide_id, f"{foreign[slide_id]}: could not be imported (see rank 0's log)")
    if len(failed) < len(foreign):
        log.info("coords: %d TRIDENT/CLAM file(s) converted into %s", len(foreign) - len(failed), own)
    return failed


def _checked_coords(config: Config, slide_path: Path, h5: Path, shown: Path | None = None) -> int:
    """Rows of a coords file, checked once per run against its slide (SlideError naming the file if not usable)
    and against the config (ConfigError: tiles of another size or mpp than ``data.tile_px`` / ``target_mpp``).
    ``shown`` is the file the user gave when ``h5`` is fullslide's conversion of it (errors name the user's)."""
    from fullslide.slides import open_slide
    from fullslide.slides.coords_io import coords_problem, read_coords_and_attrs
    from fullslide.slides.dicom import slide_stat

    xy, geometry, attrs = read_coords_and_attrs(h5)
    if geometry.tile_px != config.data.tile_px or abs(geometry.target_mpp / config.data.target_mpp - 1) > 0.05:
        raise ConfigError(f"{shown or h5}: tiles of {geometry.tile_px} px at {geometry.target_mpp:g} mpp, but data.tile_px is "
                          f"{config.data.tile_px} and data.target_mpp {config.data.target_mpp:g}; make them agree or "
                          "re-tile (`fullslide tile`)")
    with open_slide(slide_path, backend=config.data.backend, mpp=config.data.mpp) as slide:
        size = slide.dimensions
    problem = coords_problem(xy, geometry, attrs, size, slide_stat(slide_path)[0])
    if problem:
        raise SlideError(h5, f"{problem}; slide {slide_path}")
    return int(len(xy))


def _read_summary(path: Path) -> dict[str, str]:
    """slide_id -> message from the tiler's summary CSV (for reasons of exclusion)."""
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {row.get("slide_id", ""): row.get("message", "") for row in csv.DictReader(fh)}


def attach_features(config: Config, sources: dict[str, SlideSource], excluded: dict[str, str]) -> int | None:
    """Frozen runs read ``features/{id}.h5``; a slide without one, or whose feature rows are not its coords (other
    tiles: heatmaps would be misplaced), is excluded. Returns the features' width (one width for all files)."""
    import h5py
    import numpy as np

    if not config.data.features_dir:
        raise FullslideError("encoder.freeze is true but data.features_dir is not set (run `fullslide extract` first)")
    widths: set[int] = set()
    for slide_id in list(sources):
        path = features_path(config.data.features_dir, slide_id)
        old = sources[slide_id]
        problem = None
        if not path.exists():
            problem = f"{path}: no features (run `fullslide extract` for this slide)"
        else:
            with h5py.File(path, "r") as h5:
                n, width = h5["features"].shape
                stored = np.asarray(h5["coords"][...]) if "coords" in h5 else None
            with h5py.File(old.coords_h5, "r") as h5:
                coords = np.asarray(h5["coords"][...])
            if widths and width not in widths:
                raise FullslideError(f"{path}: features of width {width}, other files of {config.data.features_dir} "
                                     f"have {widths.pop()}: extracted by different encoders")
            widths.add(width)
            if n != len(coords) or (stored is not None and not np.array_equal(stored, coords)):
                problem = (f"{path}: {n} feature rows do not match the {len(coords)} tiles of {old.coords_h5} "
                           "(extracted from other coords? run `fullslide extract` again)")
        if problem:
            excluded[slide_id] = problem
            del sources[slide_id]
            continue
        sources[slide_id] = SlideSource(slide_id=old.slide_id, path=old.path, n_tiles=n,
                                        coords_h5=old.coords_h5, features_h5=str(path), mpp=old.mpp)
    return next(iter(widths), None)


def prepare_data(config: Config, run_dir: Path, ctx: ParallelContext, *, progress: bool = False) -> RunData:
    """Cohort + splits (made and saved, or read back from the run) + usable slides."""
    from fullslide.data.splits import assign_splits, check_no_patient_leak, read_splits_csv, write_splits_csv

    cohort = CohortTable.from_csv(config.data.cohort, task=config.data.task, label_column=config.data.label_column)
    splits_file = run_dir / SPLITS_FILE
    if splits_file.exists():
        splits = read_splits_csv(splits_file)
        unknown = sorted(set(cohort.slide_ids) - set(splits))
        if unknown:
            raise FullslideError(f"{splits_file}: slide '{unknown[0]}' of the cohort has no split (the cohort changed?)")
    else:
        splits = assign_splits(cohort, method=config.data.split_method, folds=config.data.folds, fold=config.data.fold,
                               fractions=tuple(config.data.fractions), seed=config.data.split_seed)
        if ctx.rank == 0:
            write_splits_csv(splits_file, cohort, splits)
    check_no_patient_leak(cohort, splits)
    feature_width = None
    sources, excluded = ensure_tiles(config, cohort, run_dir, ctx, progress=progress)
    stain = None
    if config.encoder.freeze:
        feature_width = attach_features(config, sources, excluded)
    else:
        stain = ensure_stain(config, sources, run_dir, ctx)
    for slide_id, why in excluded.items():
        log.warning("left out %s: %s", slide_id, why)
    return RunData(cohort=cohort, splits=splits, sources=sources, excluded=excluded, feature_width=feature_width,
                   stain=stain)


def ensure_stain(config: Config, sources: dict[str, SlideSource], folder: Path,
                 ctx: ParallelContext) -> StainNormalizer | None:
    """``data.stain_normalize``: each slide's stain fit (read from ``folder/stain_<method>.json`` or fitted by
    rank 0 and stored there) put into its source; the normaliser, or None when off.

    A slide whose tissue cannot be fitted (almost no stained pixels) keeps its pixels, with a warning."""
    import dataclasses

    from fullslide.data import stain as st

    method = config.data.stain_normalize
    if method == "none":
        return None
    path = st.store_path(folder, method)
    st.check_reference(method, config.data.stain_reference)  # on every rank: none waits for a failed rank 0
    reference_key = str(Path(config.data.stain_reference).expanduser().resolve()) if config.data.stain_reference else ""
    if ctx.rank == 0:
        store = st.load_store(path)
        if store.get("_reference", {}).get("key") != reference_key or "params" not in store.get("_reference", {}):
            params = st.reference_params(method, config.data.stain_reference, backend=config.data.backend,
                                         target_mpp=config.data.target_mpp, tile_px=config.data.tile_px)
            store = {"_reference": {"key": reference_key, "params": params}}
        changed = False
        for s in sources.values():
            stamp = [s.path, s.n_tiles]
            if store.get(s.slide_id, {}).get("stamp") == stamp:
                continue
            try:
                fit = st.fit(method, st.slide_pixels(s.path, s.coords_h5, backend=config.data.backend, mpp=s.mpp))
                store[s.slide_id] = {"stamp": stamp, "params": fit}
            except (ValueError, FullslideError, OSError) as exc:
                store[s.slide_id] = {"stamp": stamp, "params": None, "error": str(exc)}
            changed = True
        if changed:
            st.save_store(path, store)
    barrier(ctx)
    store = st.load_store(path)
    for slide_id, s in sources.items():
        entry = store.get(slide_id, {})
        if entry.get("params") is None:
            log.warning("stain normalisation: %s keeps its stains (%s)", slide_id, entry.get("error", "not fitted"))
        sources[slide_id] = dataclasses.replace(s, stain=entry.get("params"))
    return st.StainNormalizer(method, store["_reference"]["params"])


def check_trainable(data: RunData, task: str) -> None:
    """Refuse splits that cannot train what the user asked for; warn where a run stays meaningful.

    One line each, naming the cohort and the class or split at fault.
    """
    by_split: dict[str, list[Any]] = {}
    for r in data.cohort.records:
        if r.slide_id in data.sources:
            by_split.setdefault(data.splits.get(r.slide_id, ""), []).append(r)
    train, val = by_split.get("train", []), by_split.get("val", [])
    source = data.cohort.source
    if task == "classification":
        trained = {r.label for r in train}
        for name in data.cohort.classes:
            if name not in trained:
                where = sorted(s for s, rs in by_split.items() if any(r.label == name for r in rs)) or ["no usable"]
                raise FullslideError(f"{source}: class '{name}' has no training slide (only in the "
                                     f"{', '.join(where)} split): the model cannot learn it; fix the labels or splits")
        if val and len({r.label for r in val}) < 2:
            log.warning("%s: the validation split holds one class only: AUC is undefined there, so the best "
                        "checkpoint is chosen on validation loss", source)
    elif task == "survival":
        if not any(r.event for r in train):
            raise FullslideError(f"{source}: no event (event = 1) among the {len(train)} training slides: the Cox "
                                 "loss is 0 and the C-index undefined; survival needs observed events")
        if val and not any(r.event for r in val):
            log.warning("%s: no event in the validation split: the C-index is undefined there, so the best "
                        "checkpoint is chosen on validation loss", source)
    elif task == "regression" and len({r.target for r in train}) < 2:
        raise FullslideError(f"{source}: every training slide has the same target: there is nothing to regress")


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_text(run_dir / RUN_FILE, json.dumps(info, indent=1))


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        raise FullslideError(f"{run_dir}: not a fullslide run folder (no {RUN_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def build_model(config: Config, n_outputs: int, *, init_weights: bool = True) -> torch.nn.Module:
    """The run's SlideModel, initialised from ``train.seed`` (and the encoder's weights file, if any and
    ``init_weights``: a model about to receive a checkpoint's weights does not read it)."""
    from fullslide.models import create_model

    torch.manual_seed(config.train.seed)
    model = create_model(
        config.encoder.name, config.aggregator.name, n_outputs, weights=config.encoder.weights if init_weights else None,
        tile_px=config.data.tile_px, drop_rate=config.encoder.drop_rate, drop_path_rate=config.encoder.drop_path_rate,
        freeze_bn=config.encoder.freeze_bn, strict=config.encoder.strict, encoder_kwargs=config.encoder.kwargs,
        aggregator_kwargs=config.aggregator.kwargs,
        aggregator_weights=config.aggregator.weights if init_weights else None,
    )
    apply_finetuning(config, model.encoder)
    return model


def apply_finetuning(config: Config, encoder: torch.nn.Module) -> None:
    """The encoder section's fine-tuning controls (LoRA, last-N blocks, block checkpointing), in place."""
    from fullslide.models import finetune

    enc = config.encoder
    if enc.lora_rank:
        finetune.add_lora(encoder, enc.lora_rank, enc.lora_alpha, enc.lora_dropout, enc.lora_targets)
    if enc.trainable_blocks is not None:
        if enc.lora_rank:
            raise ConfigError("encoder.trainable_blocks and encoder.lora_rank: choose one")
        finetune.train_last_blocks(encoder, enc.trainable_blocks)
    if enc.grad_checkpointing:
        finetune.set_block_checkpointing(encoder, True)


def amp_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of the encoder: bf16 on GPU by default, none (fp32) on CPU."""
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
