"""``fullslide plan CONFIG``: will a config fit, and how fast, before any run starts.

The config's encoder (architecture only: no weights are read) and aggregator are probed once on zero tiles of the
config's size and dtype (``fullslide.engine.budget.probe_encoder``: saved-tensor hooks on CPU, the allocator on
CUDA). From the measured bytes per tile it predicts, for each memory mode, the peak one rank's step adds, the
largest K that fits the budget, and the compute relative to ``full``. ``--device-memory 80GB`` plans for a GPU this
machine does not have: the budget is that size (times ``train.memory_budget`` when it is a fraction, default 0.8)
and the probe runs in the GPU's default precision (bf16 under ``precision: auto``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from fullslide.engine.budget import (
    Probe, choose_chunk_tiles, format_bytes, largest_k, mode_activation_bytes, parse_bytes,
    probe_encoder, resolve_budget,
)
from fullslide.engine.recompute import MODES
from fullslide.errors import ConfigError


@dataclass(frozen=True)
class ModePlan:
    mode: str
    activation_bytes: int  # predicted peak of what autograd holds for backward
    step_bytes: int  # activation bytes + features
    largest_k: int  # tiles per slide that fit the budget
    compute: float  # forward-backward units relative to full


@dataclass(frozen=True)
class PlanReport:
    k: int  # tiles per slide
    tiles_per_rank: int  # K x slides per step / tile_parallel
    tile_px: int
    chunk_tiles: int
    budget_bytes: int
    amp_dtype: str
    probe: Probe
    modes: list[ModePlan]
    context_tiles: int = 0  # train.context: cache: tiles per slide N whose rows the aggregator also reads

    def table(self) -> str:
        lines = [f"tiles per slide K={self.k}, {self.tiles_per_rank} tiles per rank per step, chunk_tiles="
                 f"{self.chunk_tiles}, precision {self.amp_dtype}, budget {format_bytes(self.budget_bytes)}",
                 f"probe ({self.probe.source}): {format_bytes(self.probe.graph_bytes_per_tile)} of encoder activations "
                 f"per tile (+{format_bytes(self.probe.transient_bytes_per_tile)} transient), "
                 f"{format_bytes(self.probe.aggregator_bytes_per_tile)} aggregator activations per tile",
                 "",
                 f"{'mode':<11}{'predicted peak':>16}{'fits':>6}{'largest K':>12}{'compute':>10}"]
        for m in self.modes:
            fits = "yes" if m.step_bytes <= self.budget_bytes else "NO"
            lines.append(f"{m.mode:<11}{format_bytes(m.step_bytes):>16}{fits:>6}{m.largest_k:>12,}{m.compute:>9.2f}x")
        step_tiles = self.tiles_per_rank * 3 * self.tile_px**2
        if self.context_tiles:
            lines += ["", f"context: cache with N = {self.context_tiles:,} tiles per slide (--slide-tiles): the peaks "
                          f"include the N x D context rows and the aggregator over N rows; the host holds each step "
                          f"slide's cached rows ({format_bytes(self.context_tiles * self.probe.feature_dim * 2)} in "
                          f"float16)"]
        lines += ["", f"peaks are what one rank's step adds (activations + K x D features); the step's uint8 tiles "
                      f"({format_bytes(step_tiles)}) wait in host memory. recompute and auto hold one chunk graph at "
                      "a time, so their largest K is bounded by the features and by the host memory for tiles."]
        return "\n".join(lines)


def plan_config(config: Any, *, k: int | None = None, device_memory: str | None = None, slide_tiles: int | None = None,
                device: str | None = None) -> PlanReport:
    """Probe ``config``'s model and predict each mode's step memory (see the module docstring); with
    ``train.context: cache``, ``slide_tiles`` (N, default 10,000) is the size of the slides whose rows join."""
    from fullslide.engine.aggregate import AGGREGATOR_CHUNK_TILES, is_attention_pooling
    from fullslide.train.setup import amp_dtype, build_model

    train = config.train
    context_tiles = (slide_tiles or 10_000) if train.context == "cache" else 0
    if k is None:
        if train.tiles_per_slide == "all":
            raise ConfigError("plan: train.tiles_per_slide is 'all'; give --k (tiles of your largest slide)")
        k = int(train.tiles_per_slide)
    total = 0
    if device_memory is not None:  # checked before any model is built
        try:
            total = parse_bytes(device_memory)
        except ValueError as exc:
            raise ConfigError(f"--device-memory: {exc}") from None
        if total <= 1:
            raise ConfigError(f"--device-memory {device_memory!r}: give a size such as 80GB, 80GiB or 80G")
    where = torch.device(device or ("cuda" if torch.cuda.is_available() and train.device != "cpu" else "cpu"))
    bare = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, weights=None))
    model = build_model(bare, 2).to(where).train()
    if device_memory is not None:
        budget_bytes = resolve_budget(train.memory_budget, where, available=int(total))
        amp = torch.bfloat16 if train.precision in ("auto", "bf16") else (
            torch.float16 if train.precision == "fp16" else None)
    else:
        budget_bytes = resolve_budget(train.memory_budget, where)
        amp = amp_dtype(config, where)
    px = config.data.tile_px
    probe = probe_encoder(model.encoder, torch.zeros((4, 3, px, px), dtype=torch.uint8, device=where), device=where,
                          amp_dtype=amp, aggregator=model.aggregator)
    tiles = max(1, k * train.slides_per_step // max(1, train.tile_parallel))
    chunk = choose_chunk_tiles(probe, budget_bytes, k) if train.chunk_tiles == "auto" else int(train.chunk_tiles)
    streams = is_attention_pooling(model.aggregator)
    modes = []
    for mode in MODES:
        act, total_bytes, compute = mode_activation_bytes(probe, mode, tiles=tiles, chunk_tiles=chunk,
                                                          aggregator_chunk_tiles=AGGREGATOR_CHUNK_TILES,
                                                          streams=streams, budget_bytes=budget_bytes)
        per_rank = largest_k(probe, mode, budget_bytes=budget_bytes, chunk_tiles=chunk,
                             aggregator_chunk_tiles=AGGREGATOR_CHUNK_TILES, streams=streams)
        largest = per_rank * max(1, train.tile_parallel) // max(1, train.slides_per_step)
        if context_tiles:  # every rank of a group holds the slide's N rows and runs the aggregator over them
            rows = max(0, context_tiles - k)
            agg_rows = context_tiles if not streams or mode in ("full", "checkpoint", "auto") else min(
                context_tiles, AGGREGATOR_CHUNK_TILES)
            extra = train.slides_per_step * int(rows * probe.feature_dim * 4 + probe.aggregator_bytes(agg_rows))
            act, total_bytes = act + extra, total_bytes + extra
        modes.append(ModePlan(mode, act, total_bytes, largest, compute))
    return PlanReport(k=k, tiles_per_rank=tiles, tile_px=px, chunk_tiles=chunk, budget_bytes=budget_bytes,
                      amp_dtype=str(amp).replace("torch.", "") if amp else "float32", probe=probe, modes=modes,
                      context_tiles=context_tiles)
