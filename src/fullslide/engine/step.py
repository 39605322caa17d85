"""The public engine API: one training step's exact gradient, and memory-bounded inference.

``step`` accumulates into ``.grad`` exactly the gradient of ``loss_fn(logits of all slides of the step,
targets)`` - for ``cross_entropy`` that is the mean slide loss - whatever the memory mode, the chunk size, the
number of processes and their layout. The phases, each a named function below:

1. encode     this rank's tiles, chunk by chunk (graph kept, checkpointed, or none: ``mode``; ``auto`` keeps
              the graphs of as many chunks as ``memory_budget`` allows, measured by a probe: ``budget.py``);
2. gather     features inside the tile-parallel group -> every rank holds ``[K, D]`` of its slides;
3. aggregate  every slide on every rank of its group (replicated: no idle rank, no scatter), exchange the
              step's logits over the world, compute the loss, backpropagate to the aggregator and to the
              features (dLoss/dFeatures, ``[K, D]``); in ``recompute`` mode attention-pooling aggregators are
              streamed chunk by chunk too (``aggregate.py``), so no K x hidden activations are kept;
4. backward   through the encoder with this rank's slice of dLoss/dFeatures (re-encoding chunk by chunk in
              ``recompute`` mode);
5. reduce     gradients over the world, so every rank ends with the single-process gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from fullslide.engine import recompute
from fullslide.engine.budget import AutoPlan, plan_chunks, probe_encoder, resolve_budget
from fullslide.engine.aggregate import (
    AGGREGATOR_CHUNK_TILES,
    aggregate_graph,
    is_attention_pooling,
    stream_backward,
    stream_forward,
)
from fullslide.engine.collectives import ParallelContext, all_gather_rows, all_reduce_gradients, share_rows
from fullslide.engine.mesh import chunk_bounds, rank_chunk_range, rank_tile_range
from fullslide.engine.recompute import MODES, Mode, autocast_ctx
from fullslide.errors import FullslideError
from fullslide.models.aggregators import run_aggregator

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteLossError(FullslideError):
    """The step's loss is NaN or infinite; no gradient was accumulated."""


@dataclass
class Bag:
    """One slide of a step, as this rank holds it.

    ``tiles`` is this rank's share ``[k_local, 3, H, W]`` (uint8 0-255 or float 0-1) of a slide with
    ``k_total`` tiles over its tile-parallel group (see :func:`fullslide.engine.rank_tile_range`); with one
    process it is simply all K tiles. ``features`` ``[k_local, D]`` may replace ``tiles`` (frozen encoder).
    ``index`` is the slide's row in the step's ``targets``. ``context`` ``[M, D]`` are feature rows of the
    slide's other tiles (whole-slide context, e.g. a feature cache): the aggregator sees the slide as the K fresh
    rows followed by these M rows, which get no encoder pass and no gradient; every rank of the slide's
    tile-parallel group passes the same rows. ``positions`` ``[k_total, 2]`` (all K tiles, in the slide's order,
    on every rank of the group) and ``context_positions`` ``[M, 2]`` place the tiles on the slide's tile grid for
    a spatial aggregator (``aggregator.uses_positions``); others ignore them.
    """

    index: int
    tiles: torch.Tensor | None = None
    k_total: int | None = None
    features: torch.Tensor | None = None
    context: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    context_positions: torch.Tensor | None = None

    @property
    def n_context(self) -> int:
        return 0 if self.context is None else int(self.context.shape[0])

    @property
    def k_local(self) -> int:
        data = self.tiles if self.tiles is not None else self.features
        return 0 if data is None else int(data.shape[0])


@dataclass
class StepResult:
    """What a step returns besides the gradients it accumulated."""

    loss: float  # loss_fn over every slide of the step (all slide groups); the same on every rank
    logits: torch.Tensor  # [N, C] logits of every slide of the step, detached, on CPU
    attention: dict[int, torch.Tensor]  # slide index -> [k_total] pooling weights/scores (this rank's slides)
    tiles_encoded: int  # tiles this rank encoded in phase 1
    plan: AutoPlan | None = None  # mode "auto": what was kept and recomputed on this rank
    fresh_features: dict[int, torch.Tensor] | None = None  # slides with context: their K fresh rows [K, D], detached


def _as_bags(bags: Sequence[Bag | torch.Tensor]) -> list[Bag]:
    out = [b if isinstance(b, Bag) else Bag(index=i, tiles=b) for i, b in enumerate(bags)]
    for b in out:
        if b.k_total is None:
            b.k_total = b.k_local
    return out


def _local_chunks(bag: Bag, chunk_tiles: int, ctx: ParallelContext) -> list[tuple[int, int, int]]:
    """This rank's chunks of ``bag``: (global chunk index, local start, local stop); validates the share."""
    assert bag.k_total is not None
    start, stop = rank_tile_range(bag.k_total, chunk_tiles, ctx.tp_rank, ctx.tp_size)
    if bag.k_local != stop - start:
        raise ValueError(
            f"slide {bag.index}: this rank (tile-parallel rank {ctx.tp_rank} of {ctx.tp_size}) holds {bag.k_local} "
            f"tiles, but its share of k_total={bag.k_total} with chunk_tiles={chunk_tiles} is {stop - start} "
            f"(tiles [{start}, {stop}); see fullslide.engine.rank_tile_range)"
        )
    bounds = chunk_bounds(bag.k_total, chunk_tiles)
    c0, c1 = rank_chunk_range(len(bounds), ctx.tp_rank, ctx.tp_size)
    return [(c, bounds[c][0] - start, bounds[c][1] - start) for c in range(c0, c1)]


def _stash_grads(params: Iterable[nn.Parameter]) -> dict[nn.Parameter, torch.Tensor]:
    """Set existing ``.grad`` aside so the reduction sums only this step's gradient."""
    stash = {}
    for p in params:
        if p.grad is not None:
            stash[p] = p.grad
            p.grad = None
    return stash


def _unstash_grads(stash: dict[nn.Parameter, torch.Tensor]) -> None:
    for p, g in stash.items():
        p.grad = g if p.grad is None else p.grad.add_(g)


def gather_features(
    ctx: ParallelContext, bags: list[Bag], local: list[torch.Tensor], chunk_tiles: int, feature_dim: int
) -> list[torch.Tensor]:
    """Phase 2: ``[k_local, D]`` per slide on each rank -> ``[k_total, D]`` per slide on every rank of the group."""
    if ctx.tp_size == 1:
        return local
    ranges = [[rank_tile_range(b.k_total, chunk_tiles, r, ctx.tp_size) for b in bags] for r in range(ctx.tp_size)]
    rows = [sum(e - s for s, e in per_rank) for per_rank in ranges]
    packed = torch.cat(local) if local else torch.empty((0, feature_dim), device=ctx.device)
    parts = all_gather_rows(ctx, packed, rows)  # one collective for all slides of the step
    full: list[list[torch.Tensor]] = [[] for _ in bags]
    for r, part in enumerate(parts):
        offset = 0
        for i, (s, e) in enumerate(ranges[r]):
            full[i].append(part[offset : offset + e - s])
            offset += e - s
    return [torch.cat(pieces) for pieces in full]  # rank order == global tile order


def step(
    model: nn.Module,
    bags: Sequence[Bag | torch.Tensor],
    targets: torch.Tensor,
    loss_fn: LossFn,
    *,
    mode: Mode = "recompute",
    memory_budget: int | float | str | None = None,
    chunk_tiles: int = 64,
    aggregator_chunk_tiles: int = AGGREGATOR_CHUNK_TILES,
    step_seed: int = 0,
    amp_dtype: torch.dtype | None = None,
    grad_scaler: "torch.amp.GradScaler | None" = None,
    parallel: ParallelContext | None = None,
) -> StepResult:
    """Accumulate into ``.grad`` the exact gradient of ``loss_fn(logits [N, C], targets [N, ...])``.

    ``model`` has ``.encoder`` (tiles -> ``[k, D]``, exposing ``feature_dim``) and ``.aggregator``
    (``[K, D]`` -> AggregatorOutput). ``bags`` are this rank's slides (tensors are taken as whole slides with
    index = position); ``targets`` holds all N slides of the step across all slide groups. ``step_seed``
    fixes dropout/drop-path draws (use a different one per step). ``mode="auto"`` keeps the graphs of as many
    chunks as ``memory_budget`` allows (bytes, a fraction of free memory, ``"8GB"``; None: 80% of the free
    memory) and recomputes the rest - the gradient is the same whatever it keeps. ``aggregator_chunk_tiles`` is the tile-stage
    chunk of attention pooling (part of the seeding contract, like ``chunk_tiles``). ``amp_dtype`` autocasts the encoder
    (bfloat16, or float16 with ``grad_scaler``); the aggregator and the loss run in float32.
    Raises :class:`NonFiniteLossError` (consistently on every rank) without touching ``.grad``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ctx = parallel or ParallelContext.single(next(model.parameters()).device)
    device = ctx.device
    items = _as_bags(bags)
    n_total = int(targets.shape[0])
    for b in items:
        if not 0 <= b.index < n_total:
            raise ValueError(f"slide index {b.index} is outside the {n_total} targets of this step")
        if not b.k_total:
            raise ValueError(f"slide {b.index} has no tiles")
    encoder, aggregator = model.encoder, model.aggregator
    enc_params = [p for p in encoder.parameters() if p.requires_grad]
    agg_params = [p for p in aggregator.parameters() if p.requires_grad]
    params = list(dict.fromkeys(enc_params + agg_params))  # a parameter tied between the two appears once
    feature_dim = int(getattr(encoder, "feature_dim"))
    chunk_lists = [_local_chunks(b, chunk_tiles, ctx) for b in items]
    plan, keep = None, [None] * len(items)
    if mode == "auto" and enc_params:
        plan, keep = _plan_auto(model, items, chunk_lists, chunk_tiles, aggregator_chunk_tiles, memory_budget, device,
                                amp_dtype)
    stash = _stash_grads(params)
    try:
        # Phase 1: encode this rank's share of every slide.
        passes: list[recompute.EncoderPass | None] = []
        local: list[torch.Tensor] = []
        for b, chunks, keep_chunks in zip(items, chunk_lists, keep):
            if b.tiles is None:  # precomputed features: nothing to encode, nothing to backpropagate into
                passes.append(None)
                local.append(b.features.to(device).float() if b.features is not None else None)
                continue
            p = recompute.encode(
                encoder, b.tiles, chunks, mode=mode, step_seed=step_seed, slide_index=b.index,
                device=device, amp_dtype=amp_dtype, with_grad=bool(enc_params), keep_chunks=keep_chunks,
            )
            passes.append(p)
            local.append(p.features)
        # Phase 2: every rank of the group gets all K features of its slides, then the slide's context rows
        # (K fresh rows first, so f.grad[:K] is what the encoder gets). Detached: a new leaf, never the caller's
        # precomputed tensor (no requires_grad or .grad left on it).
        fresh = gather_features(ctx, items, local, chunk_tiles, feature_dim)
        feats = [(torch.cat([f, b.context.to(device, f.dtype)]) if b.n_context else f).detach().requires_grad_()
                 for b, f in zip(items, fresh)]  # [K + M, D]
        spatial = bool(getattr(aggregator, "uses_positions", False))
        positions = [_positions(b, device) if spatial else None for b in items]  # [K + M, 2]
        # Phase 3: aggregator on every slide (replicated within the group), loss over the whole step.
        all_kept = plan is None or plan.recomputed_chunks == 0
        streamed = (mode == "recompute" or (mode == "auto" and not all_kept)) and is_attention_pooling(aggregator)
        agg_kw = dict(aggregator_chunk_tiles=aggregator_chunk_tiles, step_seed=step_seed, device=device)
        outs = [
            (stream_forward if streamed else aggregate_graph)(aggregator, f, slide_index=b.index, positions=pos,
                                                             **agg_kw)
            for b, f, pos in zip(items, feats, positions)
        ]
        n_classes = outs[0].logits.numel() if outs else _n_classes(model, feature_dim, device)
        rows = torch.zeros((n_total, n_classes), device=device)
        if ctx.tp_rank == 0:  # one writer per slide, so the world sum below is exact
            for b, o in zip(items, outs):
                rows[b.index] = o.logits.detach().float()
        all_logits = share_rows(ctx, rows).requires_grad_()  # [N, C] identical on every rank
        loss = loss_fn(all_logits, targets.to(device))
        if not torch.isfinite(loss):  # host sync: one scalar per step
            raise NonFiniteLossError(f"loss is {loss.item()} at step seed {step_seed}")
        scaled = grad_scaler.scale(loss) if grad_scaler is not None else loss
        (grad_logits,) = torch.autograd.grad(scaled, all_logits)  # [N, C]
        if outs:
            torch.autograd.backward(
                [o.logits for o in outs], [grad_logits[b.index].to(o.logits.dtype) for b, o in zip(items, outs)]
            )
        if streamed:  # re-run the tile stage chunk by chunk: aggregator grads and dLoss/dFeatures
            for b, f, o, pos in zip(items, feats, outs, positions):
                stream_backward(aggregator, f, o, slide_index=b.index, positions=pos, **agg_kw)
        # Every rank of a group holds the same aggregator gradient (replicated aggregator): keep rank 0's copy
        # only, so the world sum counts it once. Done here, before phase 4, so that the encoder-side gradient of
        # a parameter tied between encoder and aggregator, which every rank adds for its own tiles, is kept.
        if ctx.tp_rank != 0:
            for q in agg_params:
                q.grad = None
        # Phase 4: backpropagate this rank's slice of dLoss/dFeatures through the encoder.
        for b, p, f in zip(items, passes, feats):
            if p is None or not enc_params:
                continue
            start, stop = rank_tile_range(b.k_total, chunk_tiles, ctx.tp_rank, ctx.tp_size)
            recompute.backward(
                encoder, b.tiles, p, f.grad[start:stop], mode=mode, step_seed=step_seed,
                slide_index=b.index, device=device, amp_dtype=amp_dtype,
            )
        # Phase 5: sum over the world.
        all_reduce_gradients(ctx, params)
    except BaseException:
        for q in params:
            q.grad = None
        _unstash_grads(stash)
        raise
    _unstash_grads(stash)
    return StepResult(
        loss=float(loss.detach()),
        logits=all_logits.detach().cpu(),
        attention={b.index: o.attention.detach() for b, o in zip(items, outs)},
        tiles_encoded=sum(b.k_local for b in items if b.tiles is not None),
        plan=plan,
        fresh_features={b.index: f.detach() for b, f in zip(items, fresh) if b.context is not None} or None,
    )


def _plan_auto(model: nn.Module, items: list[Bag], chunk_lists: list[list[tuple[int, int, int]]], chunk_tiles: int,
               aggregator_chunk_tiles: int, memory_budget: int | float | str | None, device: torch.device,
               amp_dtype: torch.dtype | None) -> tuple[AutoPlan | None, list[int | None]]:
    """How many leading chunks of each slide keep their graph under the budget (slides in order)."""
    with_tiles = [(b, chunks) for b, chunks in zip(items, chunk_lists) if b.tiles is not None and chunks]
    if not with_tiles:
        return None, [None] * len(items)
    probe = probe_encoder(model.encoder, with_tiles[0][0].tiles, device=device, amp_dtype=amp_dtype,
                          aggregator=model.aggregator)
    sizes = [stop - start for b, chunks in with_tiles for _, start, stop in chunks]
    k_all = sum(int(b.k_total or 0) + b.n_context for b in items)  # the aggregator sees the context rows too
    streamed = min(aggregator_chunk_tiles, max(int(b.k_total or 0) + b.n_context for b in items))
    if not is_attention_pooling(model.aggregator):
        streamed = k_all  # only attention pooling streams; others keep their graph whatever the mode
    plan = plan_chunks(probe, sizes, chunk_tiles, resolve_budget(memory_budget, device),
                       aggregator_tiles=(k_all, streamed))
    keep, left = [], plan.kept_chunks
    for b, chunks in zip(items, chunk_lists):
        n = min(left, len(chunks)) if b.tiles is not None else 0
        keep.append(n)
        left -= n
    return plan, keep


def _positions(bag: Bag, device: torch.device) -> torch.Tensor:
    """The K tiles' positions then the context rows', ``[K + M, 2]`` float32 (a spatial aggregator needs them)."""
    if bag.positions is None or bag.positions.shape[0] != bag.k_total:
        raise ValueError(f"slide {bag.index}: the aggregator uses tile positions: give Bag.positions [{bag.k_total}, 2]")
    parts = [bag.positions]
    if bag.n_context:
        if bag.context_positions is None or bag.context_positions.shape[0] != bag.n_context:
            raise ValueError(f"slide {bag.index}: give Bag.context_positions [{bag.n_context}, 2] for its context rows")
        parts.append(bag.context_positions)
    return torch.cat([p.to(device, torch.float32) for p in parts])


def _n_classes(model: nn.Module, feature_dim: int, device: torch.device) -> int:
    """Logit width for a rank with no slide this step (run the aggregator on one dummy feature)."""
    with torch.no_grad():
        return int(run_aggregator(model.aggregator, torch.zeros((1, feature_dim), device=device),
                                  torch.zeros((1, 2), device=device)).logits.numel())


@dataclass
class InferResult:
    """Inference on all tiles of one slide."""

    logits: torch.Tensor  # [C]
    attention: torch.Tensor  # [K]
    tile_logits: torch.Tensor | None  # [K, C] where the aggregator classifies tiles
    features: torch.Tensor | None  # [K, D] when requested


@torch.no_grad()
def encode_tiles(
    encoder: nn.Module,
    chunks: torch.Tensor | Iterable[torch.Tensor],
    *,
    chunk_tiles: int = 64,
    amp_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Features ``[K, D]`` (float32) of all tiles, chunk by chunk, without a graph.

    ``chunks`` is one ``[K, 3, H, W]`` tensor (split into ``chunk_tiles``) or any iterable of tile batches,
    so a reader can stream a slide of 100,000 tiles without holding them all.
    """
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    if isinstance(chunks, torch.Tensor):
        chunks = chunks.split(chunk_tiles)
    feats = []
    for tiles in chunks:
        with autocast_ctx(device, amp_dtype):
            feats.append(encoder(tiles.to(device, non_blocking=True)).float())
    if not feats:
        raise ValueError("no tiles to encode")
    return torch.cat(feats)


@torch.no_grad()
def infer(
    model: nn.Module,
    chunks: torch.Tensor | Iterable[torch.Tensor],
    *,
    chunk_tiles: int = 64,
    amp_dtype: torch.dtype | None = None,
    return_features: bool = False,
    positions: torch.Tensor | None = None,
) -> InferResult:
    """Slide prediction from ALL its tiles, memory bounded by one chunk plus the ``[K, D]`` features.

    The caller sets ``model.eval()``; the aggregator runs in float32. ``positions`` ``[K, 2]``: the tiles' places
    on the slide's tile grid, for a spatial aggregator.
    """
    device = next(model.parameters()).device
    feats = encode_tiles(model.encoder, chunks, chunk_tiles=chunk_tiles, amp_dtype=amp_dtype, device=device)
    out = run_aggregator(model.aggregator, feats, positions)
    if not math.isfinite(float(out.logits.float().sum())):
        raise NonFiniteLossError("inference produced non-finite logits")
    return InferResult(
        logits=out.logits.float().cpu(),
        attention=out.attention.float().cpu(),
        tile_logits=None if out.tile_logits is None else out.tile_logits.float().cpu(),
        features=feats.cpu() if return_features else None,
    )
