"""The encoder's two phases of a step, in three memory modes that give the same gradient.

Phase ``encode`` turns this rank's tiles of one slide into features ``[k_local, D]``, chunk by chunk, each
chunk under its own seed (see :mod:`fullslide.engine.rng`):

- ``full``:       with autograd; every chunk's graph is kept until phase ``backward`` (memory grows with K);
- ``checkpoint``: with activation checkpointing per chunk; only chunk inputs are kept, phase ``backward``
                  recomputes each chunk inside autograd;
- ``recompute``:  without a graph; phase ``backward`` re-encodes one chunk at a time with a graph and
                  backpropagates its slice of dLoss/dFeatures, so at most one chunk's graph is ever alive;
- ``auto``:       the first ``keep_chunks`` chunks keep their graph (as in ``full``), the others run without
                  one and are recomputed (as in ``recompute``); ``budget.py`` decides how many fit.

Phase ``backward`` takes dLoss/dFeatures ``[k_local, D]`` and accumulates encoder ``.grad``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fullslide.engine.rng import derive_seed, seeded

Mode = Literal["auto", "full", "checkpoint", "recompute"]
MODES: tuple[Mode, ...] = ("auto", "full", "checkpoint", "recompute")


@dataclass
class EncoderPass:
    """What phase ``encode`` leaves for phase ``backward`` for one slide on this rank."""

    features: torch.Tensor  # [k_local, D] float32, detached
    chunks: list[tuple[int, int, int]]  # (global chunk index, local start, local stop)
    graph_outputs: list[torch.Tensor] = field(default_factory=list)  # one per kept chunk (the first ones)


def autocast_ctx(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``amp_dtype`` on ``device`` (a no-op when ``amp_dtype`` is None)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _run_chunk(
    encoder: nn.Module, tiles: torch.Tensor, seed: int, device: torch.device, amp_dtype: torch.dtype | None
) -> torch.Tensor:
    """Encode one chunk under its seed: ``[c, 3, H, W]`` -> ``[c, D]`` (dtype of the autocast region)."""
    with seeded(seed, device), autocast_ctx(device, amp_dtype):
        out = encoder(tiles.to(device, non_blocking=True))
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != tiles.shape[0]:
        got = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a tensor of shape {tuple(out.shape)}"
        raise TypeError(
            f"the encoder returned {got} for {tiles.shape[0]} tiles; the engine needs features [tiles, D] "
            "(wrap the backbone in fullslide.models.TileEncoder, which pools token and map outputs)"
        )
    return out


def encode(
    encoder: nn.Module,
    tiles: torch.Tensor,
    chunks: list[tuple[int, int, int]],
    *,
    mode: Mode,
    step_seed: int,
    slide_index: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    with_grad: bool,
    keep_chunks: int | None = None,
) -> EncoderPass:
    """Phase 1: encode this rank's tiles ``[k_local, 3, H, W]`` of one slide, chunk by chunk
    (``keep_chunks``: in ``auto`` mode, how many of the first chunks keep their graph)."""
    feats: list[torch.Tensor] = []
    graphs: list[torch.Tensor] = []
    for position, (chunk_index, start, stop) in enumerate(chunks):
        seed = derive_seed(step_seed, slide_index, chunk_index)
        keep_graph = with_grad and mode != "recompute" and (mode != "auto" or position < (keep_chunks or 0))
        if not keep_graph:
            with torch.no_grad():
                out = _run_chunk(encoder, tiles[start:stop], seed, device, amp_dtype)
        elif mode == "checkpoint":
            out = checkpoint(
                _run_chunk, encoder, tiles[start:stop], seed, device, amp_dtype,
                use_reentrant=False, preserve_rng_state=False,  # the chunk re-seeds itself on recompute
            )
        else:
            out = _run_chunk(encoder, tiles[start:stop], seed, device, amp_dtype)
        if keep_graph:
            graphs.append(out)  # [c, D] with its graph
        feats.append(out.detach().float())
    if feats:
        features = torch.cat(feats)  # [k_local, D]
    else:
        features = torch.empty((0, int(getattr(encoder, "feature_dim", 0))), device=device)
    return EncoderPass(features=features, chunks=chunks, graph_outputs=graphs)


def backward(
    encoder: nn.Module,
    tiles: torch.Tensor,
    enc_pass: EncoderPass,
    grad_features: torch.Tensor,
    *,
    mode: Mode,
    step_seed: int,
    slide_index: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> None:
    """Phase 2: accumulate encoder ``.grad`` from dLoss/dFeatures ``[k_local, D]`` of one slide."""
    kept = len(enc_pass.graph_outputs)
    if kept:  # the kept graphs first: freed before any chunk is recomputed
        grads = [grad_features[s:e].to(out.dtype) for (_, s, e), out in zip(enc_pass.chunks, enc_pass.graph_outputs)]
        torch.autograd.backward(enc_pass.graph_outputs, grads)
        enc_pass.graph_outputs.clear()
    if mode not in ("recompute", "auto"):
        return
    for chunk_index, start, stop in enc_pass.chunks[kept:]:
        # Same seed as phase 1: dropout / drop-path draw the same masks, so this graph is phase 1's graph.
        out = _run_chunk(encoder, tiles[start:stop], derive_seed(step_seed, slide_index, chunk_index), device, amp_dtype)
        torch.autograd.backward(out, grad_features[start:stop].to(out.dtype))
        del out  # this chunk's graph is freed here, before the next chunk is encoded
