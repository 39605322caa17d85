"""Running the aggregator on one slide's features ``[K, D]``: with a graph, or streamed in bounded memory.

Attention-pooling aggregators (``tile_stage`` + ``pool_head``: GMA, ABMIL, mean) run their per-tile stage on
chunks of the slide (``aggregator_chunks``: whole encoder chunks, >= 1024 tiles), each under its own seed, then pool
``z = softmax(a) @ h`` and apply the head. Other aggregators (transformer, max, user modules) are one call.

``graph``  keeps the autograd graph of the whole aggregator: memory ~ K x hidden (GMA: ~14 KB per tile).
``stream`` (``recompute`` mode) runs the tile stage without a graph, keeping only the K attention scores and an
           online-softmax sum, exposes ``z`` as a leaf for the head, and in the backward re-runs the tile stage
           chunk by chunk with the analytic gradients of attention pooling:
           dL/dh_k = w_k dL/dz,  dL/da_k = w_k (h_k - z) . dL/dz.  Memory ~ K scalars + one chunk.
Both give the same gradient (up to float rounding): the tests and ``check-grad`` compare them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fullslide.engine.mesh import chunk_bounds
from fullslide.engine.rng import AGGREGATOR_CHUNK, aggregator_tile_chunk, derive_seed, seeded

#: The tile stage runs on chunks of at least this many tiles (a whole number of encoder chunks when larger):
#: it is cheap per tile, so bigger chunks save per-call overhead at a few MB of memory.
MIN_AGGREGATOR_CHUNK = 1024


def aggregator_chunks(k: int, chunk_tiles: int) -> list[tuple[int, int]]:
    """The tile-stage chunk layout of a K-tile slide (a function of K and chunk_tiles only)."""
    return chunk_bounds(k, chunk_tiles * max(1, -(-MIN_AGGREGATOR_CHUNK // chunk_tiles)))


def is_attention_pooling(aggregator: nn.Module) -> bool:
    """Whether ``aggregator`` exposes the ``tile_stage`` / ``pool_head`` split (and so can be streamed)."""
    return callable(getattr(aggregator, "tile_stage", None)) and callable(getattr(aggregator, "pool_head", None))


def aggregate_graph(
    aggregator: nn.Module, feats: torch.Tensor, *, chunk_tiles: int, step_seed: int, slide_index: int,
    device: torch.device,
):  # -> AggregatorOutput
    """The aggregator on ``[K, D]`` with autograd, seeded exactly as the streamed path is."""
    if not is_attention_pooling(aggregator):
        with seeded(derive_seed(step_seed, slide_index, AGGREGATOR_CHUNK), device):
            return aggregator(feats)
    hs, scores = [], []
    for c, (start, stop) in enumerate(aggregator_chunks(feats.shape[0], chunk_tiles)):
        with seeded(derive_seed(step_seed, slide_index, aggregator_tile_chunk(c)), device):
            h, a = aggregator.tile_stage(feats[start:stop])
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

    @property
    def attention(self) -> torch.Tensor:
        return torch.exp(self.scores - self.lse)  # [K]


def stream_forward(
    aggregator: nn.Module, feats: torch.Tensor, *, chunk_tiles: int, step_seed: int, slide_index: int,
    device: torch.device,
) -> StreamedPool:
    """Tile stage chunk by chunk without a graph (online softmax), then the head on a leaf ``z``."""
    k = feats.shape[0]
    scores = torch.empty(k, device=feats.device)
    m = torch.tensor(float("-inf"), device=feats.device)  # running max of scores
    total = torch.zeros((), device=feats.device)  # running sum of exp(a - m)
    acc = None  # running sum of exp(a - m) * h   [H]
    with torch.no_grad():
        for c, (start, stop) in enumerate(aggregator_chunks(k, chunk_tiles)):
            with seeded(derive_seed(step_seed, slide_index, aggregator_tile_chunk(c)), device):
                h, a = aggregator.tile_stage(feats[start:stop])
            h, a = h.float(), a.float()
            scores[start:stop] = a
            m_new = torch.maximum(m, a.max())  # stays on device: no host sync
            rescale = torch.exp(m - m_new)
            e = torch.exp(a - m_new)  # [k]
            total = total * rescale + e.sum()
            acc = e @ h if acc is None else acc * rescale + e @ h
            m = m_new
    z = (acc / total).requires_grad_()
    with seeded(derive_seed(step_seed, slide_index, AGGREGATOR_CHUNK), device):
        logits = aggregator.pool_head(z)
    return StreamedPool(scores=scores, lse=m + torch.log(total), z=z, logits=logits)


def stream_backward(
    aggregator: nn.Module, feats: torch.Tensor, pool: StreamedPool, *, chunk_tiles: int, step_seed: int,
    slide_index: int, device: torch.device,
) -> None:
    """Accumulate tile-stage ``.grad`` and ``feats.grad`` (``feats`` is a leaf) from ``pool.z.grad``."""
    dz = pool.z.grad  # [H]
    if dz is None:
        return
    z_dot = torch.dot(pool.z.detach(), dz)
    for c, (start, stop) in enumerate(aggregator_chunks(feats.shape[0], chunk_tiles)):
        with seeded(derive_seed(step_seed, slide_index, aggregator_tile_chunk(c)), device):
            h, a = aggregator.tile_stage(feats[start:stop])  # same seed: same dropout masks as phase 3a
        w = torch.exp(pool.scores[start:stop] - pool.lse)  # [k] softmax weights, constants
        outputs, grads = [h], [(w[:, None] * dz).to(h.dtype)]
        if a.requires_grad:
            outputs.append(a)
            grads.append((w * (h.detach().float() @ dz - z_dot)).to(a.dtype))
        torch.autograd.backward(outputs, grads)
        del h, a  # this chunk's graph is freed before the next one is built
