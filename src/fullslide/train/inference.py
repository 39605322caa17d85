"""Inference on ALL tiles of slides: validation, evaluation, prediction, heatmaps and feature extraction.

Tiles stream from loader workers chunk by chunk (``SlideChunks``); each slide's features are accumulated
(``[K, D]``, no graph) and the aggregator runs once per slide, so memory is bounded by one chunk plus the
features. Under torchrun the slides are split over all ranks and the results gathered. A slide that fails
to read is reported with its one-line error and left out; the others go on.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from fullslide.data.loader import SlideChunk, SlideChunks, SlideSource, make_loader
from fullslide.engine import ParallelContext, encode_tiles, infer
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
        yield chunk.data


def iterate_slides(
    sources: Sequence[SlideSource], *, chunk_tiles: int, workers: int, backend: str = "auto",
    use_features: bool = False, pin_memory: bool = False,
) -> Iterator[tuple[int, Iterator[torch.Tensor]]]:
    """(index into ``sources``, iterator over that slide's chunks) for every slide, in order.

    The chunk iterator raises on a chunk that failed to read; abandoning it skips the slide's other chunks.
    """
    loader = make_loader(SlideChunks(sources, chunk_tiles, backend=backend, use_features=use_features),
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
) -> list[SlidePrediction]:
    """Predict every slide from all its tiles (or features); results in ``sources`` order on every rank."""
    ctx = parallel or ParallelContext.single(next(model.parameters()).device)
    model.eval()
    mine = list(range(ctx.rank, len(sources), ctx.dims.world_size))
    results: dict[int, SlidePrediction] = {}
    stream = iterate_slides([sources[i] for i in mine], chunk_tiles=chunk_tiles, workers=workers, backend=backend,
                            use_features=use_features, pin_memory=ctx.device.type == "cuda")
    for local, chunks in stream:
        index = mine[local]
        slide_id = sources[index].slide_id
        try:
            if use_features:
                feats = torch.cat([c.to(ctx.device).float() for c in chunks])  # [K, D]
                out = model.aggregator(feats)
                logits, attention, tile_logits = out.logits, out.attention, out.tile_logits
            else:
                res = infer(model, chunks, chunk_tiles=chunk_tiles, amp_dtype=amp_dtype)
                logits, attention, tile_logits = res.logits, res.attention, res.tile_logits
            pred = SlidePrediction(
                slide_id=slide_id,
                logits=logits.float().cpu().numpy(),
                attention=attention.float().cpu().numpy() if keep_attention else None,
                tile_logits=None if tile_logits is None or not keep_attention else tile_logits.float().cpu().numpy(),
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


def predict_with_config(
    config: Config, model: nn.Module, sources: Sequence[SlideSource], ctx: ParallelContext, *,
    amp_dtype: torch.dtype | None, keep_attention: bool = False, use_features: bool | None = None,
) -> list[SlidePrediction]:
    """:func:`predict_slides` with a run's settings (eval chunk size, loader workers, backend, frozen features)."""
    return predict_slides(model, sources, chunk_tiles=config.eval.chunk_tiles, workers=config.train.loader_workers,
                          amp_dtype=amp_dtype, backend=config.data.backend, parallel=ctx, keep_attention=keep_attention,
                          use_features=config.encoder.freeze if use_features is None else use_features)


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
) -> Iterator[tuple[SlideSource, torch.Tensor | None, str]]:
    """(source, features [K, D] float32 or None, error) for each slide, streaming tiles from workers."""
    encoder.eval()
    device = device or next(encoder.parameters()).device
    for index, chunks in iterate_slides(sources, chunk_tiles=chunk_tiles, workers=workers, backend=backend,
                                        pin_memory=device.type == "cuda"):
        try:
            feats = encode_tiles(encoder, chunks, chunk_tiles=chunk_tiles, amp_dtype=amp_dtype, device=device)
        except (_ChunkError, ValueError) as exc:
            yield sources[index], None, str(exc)
            continue
        yield sources[index], feats.cpu(), ""
