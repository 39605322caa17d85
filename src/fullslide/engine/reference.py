"""The naive single-process reference every engine configuration is checked against.

One autograd graph over all K tiles of all slides: encode (chunk by chunk, each chunk under the seed the
engine uses, so dropout draws the same masks), concatenate, aggregate (``aggregate_graph``: the model's forward
with the same per-chunk seeds), one loss, one ``backward()``. Deliberately written without the engine's
machinery (no gathers, no streaming, no manual backward, no gradient stashing).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fullslide.engine.aggregate import aggregate_graph
from fullslide.engine.mesh import chunk_bounds
from fullslide.engine.recompute import autocast_ctx
from fullslide.engine.rng import derive_seed, seeded
from fullslide.engine.step import LossFn


def reference_step(
    model: nn.Module,
    slides: Sequence[torch.Tensor],
    targets: torch.Tensor,
    loss_fn: LossFn,
    *,
    chunk_tiles: int,
    step_seed: int,
    amp_dtype: torch.dtype | None = None,
) -> float:
    """Accumulate the gradient of ``loss_fn`` over ``slides`` (each ``[K_i, 3, H, W]``) into ``.grad``."""
    device = next(model.parameters()).device
    logits = []
    for i, tiles in enumerate(slides):
        feats = []
        for c, (start, stop) in enumerate(chunk_bounds(len(tiles), chunk_tiles)):
            with seeded(derive_seed(step_seed, i, c), device), autocast_ctx(device, amp_dtype):
                feats.append(model.encoder(tiles[start:stop].to(device)))
        features = torch.cat(feats).float()  # [K_i, D], graph over every tile
        out = aggregate_graph(model.aggregator, features, chunk_tiles=chunk_tiles, step_seed=step_seed,
                              slide_index=i, device=device)
        logits.append(out.logits.float())
    loss = loss_fn(torch.stack(logits), targets.to(device))
    loss.backward()
    return float(loss.detach())
