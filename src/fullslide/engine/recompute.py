"""The encoder's two phases of a step, in three memory modes that give the same gradient.

Phase ``encode`` turns this rank's tiles of one slide into features ``[k_local, D]``, chunk by chunk, each
chunk under its own seed (see :mod:`fullslide.engine.rng`):

- ``full``:       with autograd; every chunk's graph is kept until phase ``backward`` (memory grows with K);
- ``checkpoint``: with activation checkpointing per chunk; only chunk inputs are kept, phase ``backward``
                  recomputes each chunk inside autograd;
- ``recompute``:  without a graph; phase ``backward`` re-encodes one chunk at a time with a graph and
                  backpropagates its slice of dLoss/dFeatures, so at most one chunk's graph is ever alive.

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

Mode = Literal["full", "checkpoint", "recompute"]
MODES: tuple[Mode, ...] = ("full", "checkpoint", "recompute")


@dataclass
class EncoderPass:
    """What phase ``encode`` leaves for phase ``backward`` for one slide on this rank."""

    features: torch.Tensor  # [k_local, D] float32, detached
    chunks: list[tuple[int, int, int]]  # (global chunk index, local start, local stop)
    graph_outputs: list[torch.Tensor] = field(default_factory=list)  # full/checkpoint: one per chunk


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
) -> EncoderPass:
    """Phase 1: encode this rank's tiles ``[k_local, 3, H, W]`` of one slide, chunk by chunk."""
    feats: list[torch.Tensor] = []
    graphs: list[torch.Tensor] = []
    keep_graph = with_grad and mode != "recompute"
    for chunk_index, start, stop in chunks:
        seed = derive_seed(step_seed, slide_index, chunk_index)
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
    if mode != "recompute":
        if enc_pass.graph_outputs:
            grads = [grad_features[s:e].to(out.dtype) for (_, s, e), out in zip(enc_pass.chunks, enc_pass.graph_outputs)]
            torch.autograd.backward(enc_pass.graph_outputs, grads)
            enc_pass.graph_outputs.clear()
        return
    for chunk_index, start, stop in enc_pass.chunks:
        # Same seed as phase 1: dropout / drop-path draw the same masks, so this graph is phase 1's graph.
        out = _run_chunk(encoder, tiles[start:stop], derive_seed(step_seed, slide_index, chunk_index), device, amp_dtype)
        torch.autograd.backward(out, grad_features[start:stop].to(out.dtype))
        del out  # this chunk's graph is freed here, before the next chunk is encoded
