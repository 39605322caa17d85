"""Running the aggregator on one slide's features ``[K, D]``: with a graph, or streamed in bounded memory.

Attention-pooling aggregators (``tile_stage`` + ``pool_head``: GMA, ABMIL, mean) run their per-tile stage on
chunks of ``aggregator_chunk_tiles`` tiles (default 1024: the stage is cheap per tile, so big chunks save call
overhead at a few MB), each under its own seed, then pool ``z = softmax(a) @ h`` and apply the head. Other
aggregators (transformer, max, user modules) are one call. The chunk layout is a function of K alone, so it is
the same on every rank of a tile-parallel group (each runs the aggregator on all K features).

``graph``  keeps the autograd graph of the whole aggregator: memory ~ K x hidden (GMA: ~14 KB per tile).
``stream`` (``recompute`` mode) runs the tile stage without a graph, keeping only the K attention scores and an
           online-softmax sum, exposes ``z`` as a leaf for the head, and in the backward re-runs the tile stage
           chunk by chunk with the analytic gradients of attention pooling:
           dL/dh_k = w_k dL/dz,  dL/da_k = w_k (h_k - z) . dL/dz.  Memory ~ K scalars + one chunk.
Both give the same gradient (up to float rounding): the tests and ``check-grad`` compare them.

Spatial aggregators (``uses_positions``) get ``positions`` ``[K, 2]`` (the tiles' places on the slide's tile grid,
in the order of ``feats``): whole, or the chunk's rows for each tile-stage call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fullslide.engine.mesh import chunk_bounds
from fullslide.engine.rng import AGGREGATOR_CHUNK, aggregator_tile_chunk, derive_seed, seeded
from fullslide.models.aggregators import run_aggregator, run_tile_stage

#: Default tile-stage chunk of attention pooling.
AGGREGATOR_CHUNK_TILES = 1024


def is_attention_pooling(aggregator: nn.Module) -> bool:
    """Whether ``aggregator`` exposes the ``tile_stage`` / ``pool_head`` split (and so can be streamed)."""
    return callable(getattr(aggregator, "tile_stage", None)) and callable(getattr(aggregator, "pool_head", None))


def _rows(positions: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if positions is None else positions[start:stop]


def aggregate_graph(
    aggregator: nn.Module, feats: torch.Tensor, *, aggregator_chunk_tiles: int, step_seed: int, slide_index: int,
    device: torch.device, positions: torch.Tensor | None = None,
):  # -> AggregatorOutput
    """The aggregator on ``[K, D]`` with autograd, seeded exactly as the streamed path is."""
    if not is_attention_pooling(aggregator):
        with seeded(derive_seed(step_seed, slide_index, AGGREGATOR_CHUNK), device):
            return run_aggregator(aggregator, feats, positions)
    hs, scores = [], []
    for c, (start, stop) in enumerate(chunk_bounds(feats.shape[0], aggregator_chunk_tiles)):
        with seeded(derive_seed(step_seed, slide_index, aggregator_tile_chunk(c)), device):
            h, a = run_tile_stage(aggregator, feats[start:stop], _rows(positions, start, stop))
        hs.append(h)
        scores.append(a)
    h, a = torch.cat(hs), torch.cat(scores)  # [K, H], [K]
    weights = torch.softmax(a, dim=0)  # [K]
    with seeded(derive_seed(step_seed, slide_index, AGGREGATOR_CHUNK), device):
        logits = aggregator.pool_head(weights @ h)
    return aggregator.output(logits, weights, h)


@dataclass
class StreamedPool:
    """Phase-3a state of one slide: what the streamed backward needs, O(K) scalars plus one vector."""

    scores: torch.Tensor  # [K] attention logits a_k (float32)
    lse: torch.Tensor  # [] logsumexp of scores
    z: torch.Tensor  # [H] pooled embedding, a leaf that requires grad
    logits: torch.Tensor  # [C] pool_head(z), with its (small) graph
    tile_scores: torch.Tensor | None = None  # [K] the aggregator's own heatmap score, where it has one

    @property
    def attention(self) -> torch.Tensor:
        """The heatmap score, as the aggregator's graph path reports it: its tile score, else the weights."""
        return self.tile_scores if self.tile_scores is not None else torch.exp(self.scores - self.lse)  # [K]


def stream_forward(
    aggregator: nn.Module, feats: torch.Tensor, *, aggregator_chunk_tiles: int, step_seed: int, slide_index: int,
    device: torch.device, positions: torch.Tensor | None = None,
) -> StreamedPool:
    """Tile stage chunk by chunk without a graph (online softmax), then the head on a leaf ``z``."""
    k = feats.shape[0]
    scores = torch.empty(k, device=feats.device)
    m = torch.tensor(float("-inf"), device=feats.device)  # running max of scores
    total = torch.zeros((), device=feats.device)  # running sum of exp(a - m)
    acc = None  # running sum of exp(a - m) * h   [H]
    heat = None  # [K] the aggregator's own tile scores, where it has them
    with torch.no_grad():
        for c, (start, stop) in enumerate(chunk_bounds(k, aggregator_chunk_tiles)):
            with seeded(derive_seed(step_seed, slide_index, aggregator_tile_chunk(c)), device):
                h, a = run_tile_stage(aggregator, feats[start:stop], _rows(positions, start, stop))
            h, a = h.float(), a.float()
            scores[start:stop] = a
            tile_scores = aggregator.tile_scores(h) if callable(getattr(aggregator, "tile_scores", None)) else None
            if tile_scores is not None:
                heat = torch.empty(k, device=feats.device) if heat is None else heat
                heat[start:stop] = tile_scores
            m_new = torch.maximum(m, a.max())  # stays on device: no host sync
            rescale = torch.exp(m - m_new)
            e = torch.exp(a - m_new)  # [k]
            total = total * rescale + e.sum()
            acc = e @ h if acc is None else acc * rescale + e @ h
            m = m_new
    z = (acc / total).requires_grad_()
    with seeded(derive_seed(step_seed, slide_index, AGGREGATOR_CHUNK), device):
        logits = aggregator.pool_head(z)
    return StreamedPool(scores=scores, lse=m + torch.log(total), z=z, logits=logits, tile_scores=heat)


def stream_backward(
    aggregator: nn.Module, feats: torch.Tensor, pool: StreamedPool, *, aggregator_chunk_tiles: int, step_seed: int,
    slide_index: int, device: torch.device, positions: torch.Tensor | None = None,
) -> None:
    """Accumulate tile-stage ``.grad`` and ``feats.grad`` (``feats`` is a leaf) from ``pool.z.grad``."""
    dz = pool.z.grad  # [H]
    if dz is None:
        return
    z_dot = torch.dot(pool.z.detach(), dz)
    for c, (start, stop) in enumerate(chunk_bounds(feats.shape[0], aggregator_chunk_tiles)):
        with seeded(derive_seed(step_seed, slide_index, aggregator_tile_chunk(c)), device):
            h, a = run_tile_stage(aggregator, feats[start:stop], _rows(positions, start, stop))  # same masks as 3a
        w = torch.exp(pool.scores[start:stop] - pool.lse)  # [k] softmax weights, constants
        outputs, grads = [h], [(w[:, None] * dz).to(h.dtype)]
        if a.requires_grad:
            outputs.append(a)
            grads.append((w * (h.detach().float() @ dz - z_dot)).to(a.dtype))
        torch.autograd.backward(outputs, grads)
        del h, a  # this chunk's graph is freed before the next one is built
