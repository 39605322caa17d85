"""Inference on ALL tiles of slides: validation, evaluation, prediction, heatmaps and feature extraction.

Tiles stream from loader workers chunk by chunk (``SlideChunks``); each slide's features are accumulated
(``[K, D]``, no graph) and the aggregator runs once per slide, so memory is bounded by one chunk plus the
features. Under torchrun the slides are split over the slide groups and, inside a tile-parallel group, each
slide's tiles over its ranks (features gathered once per slide); the results are gathered on every rank. A
slide that fails to read is reported with its one-line error and left out; the others go on.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from fullslide.data.loader import SlideChunk, SlideChunks, SlideSource, make_loader, tile_positions
from fullslide.data.stain import StainNormalizer
from fullslide.engine import ParallelContext, encode_tiles, rank_tile_range
from fullslide.engine.collectives import all_gather_rows
from fullslide.models.aggregators import run_aggregator
from fullslide.train.config import Config

log = logging.getLogger("fullslide.inference")


@dataclass
class SlidePrediction:
    """Result for one slide; ``error`` is set (and the arrays empty) when it could not be read."""

    slide_id: str
    logits: np.ndarray  # [C]
    attention: np.ndarray | None = None  # [K] in coords order
    tile_logits: np.ndarray | None = None  # [K, C] where the aggregator classifies tiles
    error: str = ""


class _ChunkError(Exception):
    pass


def _data(chunks: Iterator[SlideChunk]) -> Iterator[torch.Tensor]:
    for chunk in chunks:
        if chunk.error:
            raise _ChunkError(chunk.error)
        if chunk.chunk >= 0:
            yield chunk.data


def iterate_slides(
    sources: Sequence[SlideSource], *, chunk_tiles: int, workers: int, backend: str = "auto",
    use_features: bool = False, pin_memory: bool = False, ranges: Sequence[tuple[int, int]] | None = None,
) -> Iterator[tuple[int, Iterator[torch.Tensor]]]:
    """(index into ``sources``, iterator over that slide's chunks) for every slide, in order.

    The chunk iterator raises on a chunk that failed to read; abandoning it skips the slide's other chunks.
    ``ranges`` restricts each slide to this rank's tiles (tile-parallel inference).
    """
    loader = make_loader(SlideChunks(sources, chunk_tiles, backend=backend, use_features=use_features, ranges=ranges),
                         workers=workers, pin_memory=pin_memory)
    for s, group in itertools.groupby(loader, key=lambda c: c.slide):
        yield s, _data(group)


@torch.no_grad()
def predict_slides(
    model: nn.Module,
    sources: Sequence[SlideSource],
    *,
    chunk_tiles: int,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    use_features: bool = False,
    keep_attention: bool = False,
    backend: str = "auto",
    parallel: ParallelContext | None = None,
    on_slide: Callable[[SlidePrediction], None] | None = None,
    stain: StainNormalizer | None = None,
) -> list[SlidePrediction]:
    """Predict every slide from all its tiles (or features); results in ``sources`` order on every rank.

    Features come from :func:`slide_features` (tile-parallel under torchrun); the group's first rank runs the
    aggregator. The result equals single-process inference.
    """
    ctx = parallel or ParallelContext.single(next(model.parameters()).device)
    model.eval()
    results: dict[int, SlidePrediction] = {}
    for index, feats, error in slide_features(None if use_features else model.encoder, sources, ctx,
                                              chunk_tiles=chunk_tiles, workers=workers, amp_dtype=amp_dtype,
                                              backend=backend, feature_dim=model.feature_dim, stain=stain):
        slide_id = sources[index].slide_id
        if ctx.tp_rank != 0:
            continue  # the group's first rank holds the result
        try:
            if error:
                raise _ChunkError(error)
            spatial = getattr(model.aggregator, "uses_positions", False)
            out = run_aggregator(model.aggregator, feats,
                                 tile_positions(sources[index]).to(feats.device) if spatial else None)
            if not torch.isfinite(out.logits.float()).all():
                raise ValueError(f"{sources[index].path}: inference produced non-finite logits")
            pred = SlidePrediction(
                slide_id=slide_id,
                logits=out.logits.float().cpu().numpy(),
                attention=out.attention.float().cpu().numpy() if keep_attention else None,
                tile_logits=None if out.tile_logits is None or not keep_attention
                else out.tile_logits.float().cpu().numpy(),
            )
        except (_ChunkError, ValueError) as exc:
            pred = SlidePrediction(slide_id=slide_id, logits=np.zeros(0), error=str(exc))
            log.warning("skipped %s", pred.error)
        results[index] = pred
        if on_slide is not None:
            on_slide(pred)
    if ctx.distributed:
        import torch.distributed as dist

        gathered: list[dict[int, SlidePrediction] | None] = [None] * ctx.dims.world_size
        dist.all_gather_object(gathered, results)  # COLLECTIVE (world): per-slide results, once per pass
        for part in gathered:
            results.update(part or {})
    return [results.get(i) or SlidePrediction(sources[i].slide_id, np.zeros(0), error=f"{sources[i].path}: no tiles")
            for i in range(len(sources))]


def slide_features(
    encoder: nn.Module | None, sources: Sequence[SlideSource], ctx: ParallelContext, *, chunk_tiles: int,
    workers: int = 0, amp_dtype: torch.dtype | None = None, backend: str = "auto", feature_dim: int,
    stain: StainNormalizer | None = None,
) -> Iterator[tuple[int, torch.Tensor | None, str]]:
    """(index into ``sources``, features ``[K, D]`` of ALL its tiles or None, error) for this slide group's slides,
    on every rank of the group. ``encoder`` None reads stored features instead of encoding tiles.

    Slides are split over the slide groups; inside a tile-parallel group each rank reads and encodes its share of
    a slide's tiles (whole chunks of the global layout, as in training) and the features are gathered once per
    slide, so one huge slide uses every GPU of the group; the features equal single-process ones.
    """
    mine = list(range(ctx.slide_group, len(sources), ctx.dims.slide_groups))
    ranges = [rank_tile_range(sources[i].n_tiles, chunk_tiles, ctx.tp_rank, ctx.tp_size) for i in mine]
    stream = iterate_slides([sources[i] for i in mine], chunk_tiles=chunk_tiles, workers=workers, backend=backend,
                            use_features=encoder is None, pin_memory=ctx.device.type == "cuda",
                            ranges=ranges if ctx.tp_size > 1 else None)
    for local, chunks in stream:
        index = mine[local]
        error, feats = "", None
        try:
            if encoder is None:
                parts = [c.to(ctx.device).float() for c in chunks]
            elif stain is not None:  # on the device, per slide, before the encoder (as in training)
                parts = [stain(c.to(ctx.device, non_blocking=True), sources[index].stain) for c in chunks]
            else:
                parts = list(chunks)
            if parts:
                feats = torch.cat(parts) if encoder is None else encode_tiles(
                    encoder, parts, chunk_tiles=chunk_tiles, amp_dtype=amp_dtype, device=ctx.device)  # [k_local, D]
        except (_ChunkError, ValueError) as exc:
            error = str(exc)
        if ctx.tp_size > 1:
            feats, error = _gather_slide(ctx, sources[index], chunk_tiles, feats, error, feature_dim)
        elif feats is None and not error:
            error = f"{sources[index].path}: no tiles"
        yield index, feats, error


def _gather_slide(ctx: ParallelContext, source: SlideSource, chunk_tiles: int, local: torch.Tensor | None,
                  error: str, feature_dim: int) -> tuple[torch.Tensor | None, str]:
    """All of a slide's features on every rank of the group (or the same error on all of them)."""
    import torch.distributed as dist

    failed = torch.tensor([1 if error else 0], device=ctx.device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=ctx.tp_group)  # COLLECTIVE (group): did any rank fail?
    if int(failed.item()):  # host sync: one per slide
        return None, error or f"{source.path}: a tile could not be read on another rank of the tile-parallel group"
    if local is None:
        local = torch.empty((0, feature_dim), device=ctx.device)
    rows = [b - a for a, b in (rank_tile_range(source.n_tiles, chunk_tiles, r, ctx.tp_size) for r in range(ctx.tp_size))]
    return torch.cat(all_gather_rows(ctx, local.float(), rows)), ""  # COLLECTIVE (group) inside: [K, D]


def predict_with_config(
    config: Config, model: nn.Module, sources: Sequence[SlideSource], ctx: ParallelContext, *,
    amp_dtype: torch.dtype | None, keep_attention: bool = False, use_features: bool | None = None,
    stain: StainNormalizer | None = None,
) -> list[SlidePrediction]:
    """:func:`predict_slides` with a run's settings (eval chunk size, loader workers, backend, frozen features)."""
    return predict_slides(model, sources, chunk_tiles=config.eval.chunk_tiles, workers=config.train.loader_workers,
                          amp_dtype=amp_dtype, backend=config.data.backend, parallel=ctx, keep_attention=keep_attention,
                          use_features=config.encoder.freeze if use_features is None else use_features, stain=stain)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    sources: Sequence[SlideSource],
    *,
    chunk_tiles: int,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    backend: str = "auto",
    device: torch.device | None = None,
    parallel: ParallelContext | None = None,
    stain: StainNormalizer | None = None,
) -> Iterator[tuple[SlideSource, torch.Tensor | None, str]]:
    """(source, features [K, D] float32 or None, error) for each of this slide group's slides, streaming tiles
    from workers (tile-parallel under torchrun, see :func:`slide_features`)."""
    encoder.eval()
    ctx = parallel or ParallelContext.single(device or next(encoder.parameters()).device)
    for index, feats, error in slide_features(encoder, sources, ctx, chunk_tiles=chunk_tiles, workers=workers,
                                              amp_dtype=amp_dtype, backend=backend, stain=stain,
                                              feature_dim=int(getattr(encoder, "feature_dim"))):
        yield sources[index], None if feats is None else feats.cpu(), error
