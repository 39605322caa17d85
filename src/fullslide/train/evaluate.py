"""``eval``, ``predict``, ``extract`` and ``heatmap``: a trained run (or an encoder) applied to ALL tiles.

``eval``     a split of the run's cohort -> ``RUN/eval/SPLIT/{predictions.csv, metrics.json}`` (95% bootstrap CIs).
``predict``  new slides (tiled on the fly) -> ``OUT/predictions.csv`` (and heatmaps on request).
``extract``  per-slide features ``FEATURES/features/{slide_id}.h5`` (``features`` [N, D], ``coords`` [N, 2]) for the
             frozen-encoder baseline; resumable (a slide already extracted with the same encoder is skipped).
``heatmap``  attention / per-tile prediction maps (PNG + QuPath GeoJSON) for slides of a split.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fullslide.data.loader import SlideSource
from fullslide.engine import init_parallel
from fullslide.errors import FullslideError
from fullslide.train import checkpoint as ckpt
from fullslide.train.config import Config, load_run_config
from fullslide.train.inference import SlidePrediction, extract_features, predict_with_config
from fullslide.train.setup import (amp_dtype, build_model, ensure_stain, ensure_tiles, features_path,
                                   prepare_data, read_run_info)
from fullslide.train.validate import prediction_rows, score_predictions, write_csv, write_json

log = logging.getLogger("fullslide.eval")


def load_run(run_dir: Path, checkpoint: str = "best", tile_parallel: int = 1):  # -> (config, info, model, ctx)
    """A trained run's config, run.json, model with the chosen checkpoint's weights, and context (under torchrun,
    ``tile_parallel`` ranks share each slide's tiles)."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    config = load_run_config(run_dir)
    ctx = inference_parallel(tile_parallel, config.train.device)
    # the checkpoint holds every weight: the initial encoder file need not exist where the run is read
    model = build_model(config, int(info["n_outputs"]),
                        init_weights=config.encoder.name.startswith("hf-hub:")).to(ctx.device)  # hf-hub: its config.json
    where = ckpt.checkpoint_dir(run_dir, checkpoint)
    ckpt.load_weights_into(model, where)
    log.info("loaded %s", where)
    return config, info, model, ctx


def inference_parallel(tile_parallel: int, device: str):  # -> ParallelContext
    """The context of an inference job; ``tile_parallel`` must divide the torchrun world (one line if not)."""
    try:
        return init_parallel(tile_parallel, device=device)
    except ValueError as exc:
        raise FullslideError(f"--tile-parallel {tile_parallel}: {exc}") from None


def evaluate_run(run_dir: Path, *, split: str = "test", checkpoint: str = "best", out: Path | None = None,
                 progress: bool = False, tile_parallel: int = 1) -> tuple[Path, str]:
    """Predict every slide of ``split`` on all its tiles and score it; returns (folder, metrics line)."""
    from fullslide.train.losses import make_loss
    from fullslide.train.metrics import format_metrics

    config, info, model, ctx = load_run(run_dir, checkpoint, tile_parallel)
    data = prepare_data(config, Path(run_dir), ctx)
    sources = data.split_sources(split)
    if not sources:
        raise FullslideError(f"{run_dir}: no usable slide in split '{split}'")
    preds = predict_with_config(config, model, sources, ctx, amp_dtype=amp_dtype(config, ctx.device),
                                stain=data.stain)
    loss_fn = make_loss(config.data.task, n_classes=len(info["classes"]))
    scores = score_predictions(config.data.task, data.cohort, preds, loss_fn=loss_fn,
                               n_bootstrap=config.eval.bootstrap, seed=config.train.seed)
    out = Path(out) if out is not None else Path(run_dir) / "eval" / split
    if ctx.rank != 0:  # every rank holds the results; one writes them
        return out, ""
    out.mkdir(parents=True, exist_ok=True)
    rows = prediction_rows(config.data.task, data.cohort, info["classes"], preds, data.splits)
    write_csv(out / "predictions.csv", rows)
    if config.data.task == "classification":  # roc.csv / pr.csv and their PNGs
        from fullslide.viz.curves import curve_inputs, write_curves

        write_curves({split: curve_inputs(rows, info["classes"])}, out, f"{Path(run_dir).name}, {split}")
    failed = {p.slide_id: p.error for p in preds if p.error}
    failed.update({k: v for k, v in data.excluded.items() if data.splits.get(k) == split})
    write_json(out / "metrics.json", {"split": split, "checkpoint": str(ckpt.checkpoint_dir(run_dir, checkpoint)),
                                      "n_slides": len(preds) - sum(1 for p in preds if p.error),
                                      "failed": failed, "metrics": scores})
    return out, f"{split}: " + format_metrics({k: v for k, v in scores.items() if k != "error"})


def predict_new(run_dir: Path, inputs: Sequence[str | Path], out: Path, *, checkpoint: str = "best",
                mpp: float | None = None, heatmaps: bool = False, progress: bool = False,
                tile_parallel: int = 1) -> tuple[Path, int, int]:
    """Tile (if needed) and predict new slides; returns (predictions.csv, slides predicted, slides failed)."""
    from fullslide.slides import tile_slides

    config, info, model, ctx = load_run(run_dir, checkpoint, tile_parallel)
    out = Path(out)
    results = tile_slides(inputs, out / "tiles", target_mpp=config.data.target_mpp, tile_px=config.data.tile_px,
                          tissue_threshold=config.data.tissue_threshold, workers=max(1, config.train.loader_workers),
                          backend=config.data.backend, mpp=mpp, progress=progress)
    sources = [SlideSource(slide_id=r.slide_id, path=str(r.path), n_tiles=r.n_tiles, coords_h5=str(r.h5_path), mpp=mpp)
               for r in results if not r.failed and r.n_tiles > 0 and r.h5_path is not None]
    failures = [SlidePrediction(r.slide_id, np.zeros(0), error=r.message or f"{r.path}: no tissue tiles")
                for r in results if r.failed or r.n_tiles == 0]
    by_id = {s.slide_id: s for s in sources}
    stain = ensure_stain(config, by_id, out, ctx)
    sources = list(by_id.values())
    preds = predict_with_config(config, model, sources, ctx, amp_dtype=amp_dtype(config, ctx.device),
                                keep_attention=heatmaps, use_features=False, stain=stain)  # new slides: from pixels
    n_failed = sum(1 for p in preds if p.error) + len(failures)
    if ctx.rank != 0:  # every rank holds the results; one writes them
        return out / "predictions.csv", len(preds) - n_failed + len(failures), n_failed
    cohort = _labels_from_inputs(inputs, config, info)
    write_csv(out / "predictions.csv", prediction_rows(config.data.task, cohort, info["classes"], preds + failures))
    if heatmaps:
        for source, pred in zip(sources, preds):
            if not pred.error:
                draw_slide_heatmap(source, pred, out / "heatmaps", backend=config.data.backend)
    n_failed = sum(1 for p in preds if p.error) + len(failures)
    for p in failures + [p for p in preds if p.error]:
        log.warning("failed: %s", p.error)
    return out / "predictions.csv", len(preds) - sum(1 for p in preds if p.error), n_failed


def _labels_from_inputs(inputs: Sequence[str | Path], config: Config, info: dict):  # -> CohortTable | None
    """When the only input is a CSV with labels, use them for the label column of predictions.csv."""
    from fullslide.data.cohort import CohortTable

    if len(inputs) != 1 or Path(inputs[0]).suffix.lower() != ".csv":
        return None
    try:
        return CohortTable.from_csv(inputs[0], task=config.data.task, label_column=config.data.label_column,
                                    classes=info["classes"] or None, check_paths=False, require_labels=False)
    except FullslideError as exc:
        log.warning("labels not used: %s", exc)
        return None


def encoder_fingerprint(config: Config) -> str:
    """What the features depend on: encoder name, weights file (and its size/mtime), tiles, seed."""
    weights = config.encoder.weights
    stat = Path(weights).stat() if weights else None
    payload = [config.encoder.name, weights, stat and (stat.st_size, int(stat.st_mtime)), config.data.tile_px,
               config.data.target_mpp, config.train.seed, config.encoder.kwargs]
    if config.data.stain_normalize != "none":  # the pixels the encoder saw
        payload += [config.data.stain_normalize, config.data.stain_reference]
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:20]


def extract(config: Config, *, out: Path | None = None, progress: bool = False,
            tile_parallel: int = 1) -> tuple[Path, int, int]:
    """Features of every cohort slide with the config's encoder; returns (folder, extracted, failed)."""
    import h5py

    from fullslide.atomic import atomic_path
    from fullslide.data.cohort import CohortTable
    from fullslide.slides import read_coords

    target = Path(out or config.data.features_dir or "")
    if not str(target):
        raise FullslideError("extract: give --out or set data.features_dir")
    if target.exists() and not target.is_dir():
        raise FullslideError(f"{target}: exists and is not a folder (extract writes a folder of features)")
    ctx = inference_parallel(tile_parallel, config.train.device)
    cohort = CohortTable.from_csv(config.data.cohort, task=config.data.task, label_column=config.data.label_column,
                                  require_labels=False)
    sources, excluded = ensure_tiles(config, cohort, target, ctx, progress=progress)
    stain = ensure_stain(config, sources, target, ctx)
    fingerprint = encoder_fingerprint(config)
    todo = []
    for source in sources.values():
        path = features_path(target, source.slide_id)
        if path.exists():
            try:
                with h5py.File(path, "r") as h5:
                    if h5.attrs.get("fingerprint") == fingerprint and h5["features"].shape[0] == source.n_tiles:
                        continue
            except OSError:
                pass
        todo.append(source)
    encoder = build_model(config, 2).encoder.to(ctx.device)
    n_ok = len(sources) - len(todo)
    for source, feats, error in extract_features(encoder, todo, chunk_tiles=config.eval.chunk_tiles,
                                                 workers=config.train.loader_workers,
                                                 amp_dtype=amp_dtype(config, ctx.device), backend=config.data.backend,
                                                 parallel=ctx, stain=stain):
        if ctx.tp_rank != 0:  # the group's first rank writes the slide's file
            continue
        if feats is None:
            excluded[source.slide_id] = error
            continue
        coords, geometry = read_coords(source.coords_h5)
        path = features_path(target, source.slide_id)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
            h5.create_dataset("features", data=feats.numpy().astype(np.float32))
            h5.create_dataset("coords", data=coords)
            h5.attrs.update({"encoder": config.encoder.name, "weights": str(config.encoder.weights or ""),
                             "feature_dim": int(feats.shape[1]), "fingerprint": fingerprint,
                             "patch_size": geometry.tile_px, "patch_size_level0": geometry.level0_px,
                             "target_mpp": geometry.target_mpp, "name": source.slide_id})
        n_ok += 1
    for slide_id, why in excluded.items():
        log.warning("not extracted %s: %s", slide_id, why)
    return target, n_ok, len(excluded)


def draw_slide_heatmap(source: SlideSource, pred: SlidePrediction, out_dir: Path, *, backend: str = "auto",
                       max_size: int = 2048, style: Any = None, header: Any = None,
                       annotations: Path | None = None) -> list[Path]:
    """Attention (and per-tile prediction where the aggregator has one) over the thumbnail, a top/bottom tile
    gallery, and the GeoJSON (see :mod:`fullslide.viz.heatmap`)."""
    from fullslide.slides import open_slide, read_coords
    from fullslide.viz.heatmap import HeatmapStyle, write_heatmap

    coords, geometry = read_coords(source.coords_h5)
    scores = {"attention": pred.attention}
    if pred.tile_logits is not None:
        scores["tile_prediction"] = pred.tile_logits[:, -1]
    with open_slide(source.path, backend=backend, mpp=source.mpp) as slide:
        thumb = slide.thumbnail(max_size)
        return write_heatmap(out_dir, source.slide_id, thumb, slide.dimensions, coords, geometry.level0_px, scores,
                             style=style or HeatmapStyle(), header=header, annotations=annotations,
                             read_tiles=lambda xy: slide.read_tiles(xy, geometry))


def annotation_for(slide_id: str, annotations: Path | None) -> Path | None:
    """The annotation file of one slide: ``annotations`` itself when it is a file, else ``{slide_id}.geojson``,
    ``.json`` or ``.png`` (a lesion mask) inside that folder; None when there is none."""
    if annotations is None:
        return None
    if annotations.is_file():
        return annotations
    for suffix in (".geojson", ".json", ".png"):
        if (annotations / f"{slide_id}{suffix}").is_file():
            return annotations / f"{slide_id}{suffix}"
    return None


def heatmap_header(run_dir: Path, checkpoint: str, info: dict, slide_id: str, pred: SlidePrediction,
                   label: str | None) -> Any:
    """The heatmap title: slide, predicted probability (or risk) and class, label, run and checkpoint epoch."""
    import torch

    from fullslide.train.losses import predictions
    from fullslide.viz.heatmap import HeatmapHeader

    task, classes = info.get("task", "classification"), info.get("classes") or []
    values = predictions(task, torch.as_tensor(pred.logits[None]))[0]
    if task == "classification":
        top = int(values.argmax())
        shown = classes[-1] if len(classes) == 2 else classes[top]
        prob = float(values[classes.index(shown)])
        text = f"P({shown}) {prob:.3f} -> {classes[top]}"
    else:
        text = f"{'risk' if task == 'survival' else 'prediction'} {float(values):.3g}"
    try:
        where = ckpt.checkpoint_dir(run_dir, checkpoint)
        epoch = json.loads((where / "state.json").read_text()).get("epoch")
        run = f"{Path(run_dir).name}, epoch {epoch} ({checkpoint if checkpoint in ('best', 'last') else where.name})"
    except (OSError, ValueError, FullslideError):
        run = Path(run_dir).name
    return HeatmapHeader(slide_id=slide_id, prediction=text, label=label, run=run)


def heatmaps_for_run(run_dir: Path, *, split: str = "test", slide_ids: Sequence[str] | None = None,
                     checkpoint: str = "best", out: Path | None = None, tile_parallel: int = 1,
                     style: Any = None, annotations: Path | None = None) -> tuple[Path, int]:
    """Heatmaps for ``slide_ids`` (default: the split's slides); returns (folder, number of slides drawn).
    ``annotations``: a GeoJSON / mask file, or a folder of ``{slide_id}.geojson|.json|.png``, drawn as outlines."""
    from fullslide.viz.heatmap import HeatmapStyle

    style = style or HeatmapStyle()
    style.check()
    if annotations is not None and not Path(annotations).exists():
        raise FullslideError(f"{annotations}: annotation file or folder not found")
    config, info, model, ctx = load_run(run_dir, checkpoint, tile_parallel)
    data = prepare_data(config, Path(run_dir), ctx)
    if slide_ids:
        unknown = [s for s in slide_ids if s not in data.sources]
        if unknown:
            raise FullslideError(f"{run_dir}: unknown or unusable slide '{unknown[0]}'")
        sources = [data.sources[s] for s in slide_ids]
    else:
        sources = data.split_sources(split)
    preds = predict_with_config(config, model, sources, ctx, amp_dtype=amp_dtype(config, ctx.device),
                                keep_attention=True, stain=data.stain)
    out = Path(out) if out is not None else Path(run_dir) / "heatmaps"
    n = 0
    for source, pred in zip(sources, preds):
        if ctx.rank != 0:  # every rank holds the results; one draws them
            break
        if pred.error:
            log.warning("no heatmap for %s: %s", source.slide_id, pred.error)
            continue
        record = data.cohort.by_id(source.slide_id) if source.slide_id in data.cohort.slide_ids else None
        label = None if record is None else (record.label if record.label is not None else
                                             None if record.target is None else f"{record.target:g}")
        header = heatmap_header(Path(run_dir), checkpoint, info, source.slide_id, pred, label)
        draw_slide_heatmap(source, pred, out, backend=config.data.backend, style=style, header=header,
                           annotations=annotation_for(source.slide_id, Path(annotations) if annotations else None))
        n += 1
    return out, n
