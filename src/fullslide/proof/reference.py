"""The single-process reference the engine is proven against, written without any of the engine's code.

One autograd graph over every tile of every slide of a step, through the model's own modules: the encoder on
each chunk of tiles, the aggregator (its ``tile_stage`` / ``pool_head`` for attention pooling, its ``forward``
otherwise), one loss, one ``backward()``. It imports nothing from :mod:`fullslide.engine`: a bug in the
engine's seeding, chunk layout or manual backward cannot hide by being shared with the reference.

What it shares with the engine is the *contract* on random draws (README, "Randomness"), re-implemented here
from its specification so that dropout and drop-path draw the same masks:

- the seed of a block is ``blake2b-64("{step_seed}/{slide}/{block}") & (2**63 - 1)`` (little-endian bytes);
- encoder chunk ``c`` of a slide (tiles ``[c * chunk_tiles, (c + 1) * chunk_tiles)``) is block ``c``;
- the aggregator's whole-slide call (or the pooled head of attention pooling) is block ``-1``;
- tile-stage chunk ``c`` of attention pooling (tiles ``[c * aggregator_chunk_tiles, ...)``) is block ``-2 - c``;
- each block runs with the CPU generator (and the CUDA one, on a GPU) seeded with its seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

ENCODER_BLOCK = 0  # + chunk index
HEAD_BLOCK = -1
TILE_STAGE_BLOCK = -2  # - chunk index


def block_seed(step_seed: int, slide: int, block: int) -> int:
    """The seed of one block of random draws, from the contract above."""
    digest = hashlib.blake2b(f"{step_seed}/{slide}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextlib.contextmanager
def _draws(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()


def _spans(k: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, k)) for s in range(0, k, size)]


def slide_logits(
    model: nn.Module, tiles: torch.Tensor, slide: int, *, chunk_tiles: int, aggregator_chunk_tiles: int,
    step_seed: int, amp_dtype: torch.dtype | None = None, context: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits ``[C]`` of one slide with the whole graph kept, and the attention scores ``[K + M]`` (None if not
    pooling). ``context`` ``[M, D]``: feature rows of the slide's other tiles, appended after the K encoded
    ones as constants (whole-slide context: the aggregator sees them, the encoder does not). ``positions``
    ``[K + M, 2]``: every row's place on the tile grid, given to an aggregator with ``uses_positions``."""
    device = next(model.parameters()).device
    feats = []
    for c, (s, e) in enumerate(_spans(len(tiles), chunk_tiles)):
        with _draws(block_seed(step_seed, slide, ENCODER_BLOCK + c), device), _autocast(device, amp_dtype):
            feats.append(model.encoder(tiles[s:e].to(device)))
    if context is not None:
        feats.append(context.detach().to(device))
    features = torch.cat([f.float() for f in feats])  # [K + M, D]
    agg = model.aggregator
    spatial = getattr(agg, "uses_positions", False)
    pos = positions.to(device, torch.float32) if spatial else None
    if not (callable(getattr(agg, "tile_stage", None)) and callable(getattr(agg, "pool_head", None))):
        with _draws(block_seed(step_seed, slide, HEAD_BLOCK), device):
            return (agg(features, pos) if spatial else agg(features)).logits.float(), None
    hs, scores = [], []
    for c, (s, e) in enumerate(_spans(len(features), aggregator_chunk_tiles)):
        with _draws(block_seed(step_seed, slide, TILE_STAGE_BLOCK - c), device):
            h, a = agg.tile_stage(features[s:e], pos[s:e]) if spatial else agg.tile_stage(features[s:e])
        hs.append(h)
        scores.append(a)
    a = torch.cat(scores)  # [K]
    z = torch.softmax(a, dim=0) @ torch.cat(hs)  # [H]
    with _draws(block_seed(step_seed, slide, HEAD_BLOCK), device):
        return agg.pool_head(z).float(), a.detach()


def reference_step(
    model: nn.Module,
    slides: Sequence[torch.Tensor],
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    chunk_tiles: int,
    aggregator_chunk_tiles: int = 1024,
    step_seed: int,
    amp_dtype: torch.dtype | None = None,
    scores_out: list[torch.Tensor | None] | None = None,
    grad_scaler: "torch.amp.GradScaler | None" = None,
    contexts: Sequence[torch.Tensor | None] | None = None,
    positions: Sequence[torch.Tensor | None] | None = None,
) -> float:
    """Accumulate into ``.grad`` the gradient of ``loss_fn(logits of every slide, targets)``; return the loss.

    ``slides[i]`` is slide ``i`` of the step, ``[K_i, 3, H, W]``. ``scores_out`` receives each slide's attention
    scores (None where the aggregator does not pool by attention). ``grad_scaler`` (torch's) scales the loss
    before the backward, as float16 training does. ``contexts[i]`` are slide ``i``'s context rows (or None);
    ``positions[i]`` ``[K_i + M_i, 2]`` its rows' grid positions (for a spatial aggregator).
    """
    device = next(model.parameters()).device
    logits = []
    for i, tiles in enumerate(slides):
        z, scores = slide_logits(model, tiles, i, chunk_tiles=chunk_tiles, aggregator_chunk_tiles=aggregator_chunk_tiles,
                                 step_seed=step_seed, amp_dtype=amp_dtype,
                                 context=contexts[i] if contexts is not None else None,
                                 positions=positions[i] if positions is not None else None)
        logits.append(z)
        if scores_out is not None:
            scores_out.append(scores)
    loss = loss_fn(torch.stack(logits), targets.to(device))
    (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
    return float(loss.detach())


# Fine-tuning rules, written again from their specification (README, "Fine-tuning"): the transformer blocks are
# the parameters named ``...blocks.{i}...``; what the encoder registers before the first block is the
# embedding (layer 0), block ``i`` is layer ``i + 1``, and what it registers after the blocks (final norm) is
# layer ``n_blocks + 1``.
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_of_parameters(encoder: nn.Module) -> tuple[dict[int, int], int]:
    """(layer of each parameter by ``id``, number of blocks) of a ViT-style encoder."""
    named = list(encoder.named_parameters())
    in_block = [(i, int(m.group(1))) for i, (n, _) in enumerate(named) if (m := _BLOCK.search(n))]
    if not in_block:
        raise ValueError("the encoder has no parameters named blocks.<i>.")
    first, n_blocks = min(i for i, _ in in_block), 1 + max(b for _, b in in_block)
    layers = {}
    for i, (name, p) in enumerate(named):
        m = _BLOCK.search(name)
        layers[id(p)] = int(m.group(1)) + 1 if m else (0 if i < first else n_blocks + 1)
    return layers, n_blocks


def train_only_last_blocks(encoder: nn.Module, n: int) -> None:
    """Trainable: the last ``n`` blocks and everything after them; frozen: the rest."""
    layers, n_blocks = layer_of_parameters(encoder)
    for p in encoder.parameters():
        p.requires_grad_(layers[id(p)] > n_blocks - n)


def layer_decayed_lrs(encoder: nn.Module, lr: float, weight_decay: float, decay: float) -> dict[int, tuple[float, float]]:
    """(lr, weight decay) by parameter ``id``: ``lr * decay ** (n_blocks + 1 - layer)``; no decay on 1-d tensors."""
    layers, n_blocks = layer_of_parameters(encoder)
    return {id(p): (lr * decay ** (n_blocks + 1 - layers[id(p)]), weight_decay if p.ndim >= 2 else 0.0)
            for p in encoder.parameters()}
