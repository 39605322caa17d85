"""``mode="auto"``: keep every chunk graph that fits a memory budget, recompute only the rest.

Sizing comes from a probe, not from guesses: one small chunk of real tiles is encoded with a graph and the bytes
autograd keeps for backward are measured - on CUDA from the allocator (memory held after the forward, and the
forward's transient peak), elsewhere from saved-tensor hooks (:class:`~fullslide.engine.memory.SavedTensorMeter`,
exact and deterministic). The probe runs under a forked RNG with the module's buffers restored, so it changes no
draw and no BatchNorm statistic of the step. Figures are cached per (encoder, tile shape, dtype, train mode).

Cost model (forward = 1 unit, backward = 2): a kept chunk costs 3 units, a recomputed one 4 (no-graph forward,
then forward + backward), so a step costs ``1 + recomputed_share / 3`` of ``full``'s compute.
Memory model of one rank's step (bytes the step adds to what is allocated when it starts): the kept chunk
graphs (``kept_chunks x graph_bytes_per_chunk + kept_tiles x graph_bytes_per_tile``) with the larger of the
aggregator's activations (all K tiles of the step's slides when every chunk is kept and its graph is used, one
tile-stage chunk when it is streamed) and a chunk's transient; or, later, one recomputed chunk's graph, when that
is larger; plus the features (K x D x 4 bytes x 3). Phases run one after the other and kept graphs are freed
before any chunk is recomputed, so these never overlap.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

#: Default share of the free memory a step may use when no budget is given.
DEFAULT_BUDGET_FRACTION = 0.8
PROBE_TILES = 4


@dataclass(frozen=True)
class Probe:
    """Measured memory of one encoder on one tile shape and dtype."""

    graph_bytes_per_tile: float  # activations autograd keeps per tile until backward
    transient_bytes_per_tile: float  # extra peak per tile while a chunk is being encoded (no graph kept)
    feature_dim: int
    source: str  # "cuda allocator" or "saved-tensor hooks"
    aggregator_bytes_per_tile: float = 0.0  # the aggregator's activations per tile (its graph)
    graph_bytes_per_chunk: float = 0.0  # held by every chunk graph whatever its size (autocast's weight copies)
    #: the aggregator's own model of its activations for a number of rows, where it has one (a slide encoder whose
    #: attention grows faster than its rows); otherwise rows x aggregator_bytes_per_tile
    aggregator_bytes_fn: Callable[[int], float] | None = field(default=None, compare=False, repr=False)

    def chunk_graph_bytes(self, tiles: int) -> float:
        return self.graph_bytes_per_chunk + tiles * self.graph_bytes_per_tile

    def aggregator_bytes(self, rows: int) -> float:
        """The aggregator's activations over ``rows`` tile rows."""
        if self.aggregator_bytes_fn is not None and rows > 0:
            return float(self.aggregator_bytes_fn(int(rows)))
        return rows * self.aggregator_bytes_per_tile


@dataclass(frozen=True)
class AutoPlan:
    """What ``auto`` decided for one rank's step."""

    kept_chunks: int
    recomputed_chunks: int
    kept_tiles: int
    total_tiles: int
    budget_bytes: int
    predicted_peak_bytes: int  # activations + features
    predicted_activation_bytes: int  # what autograd holds for backward at the peak
    probe: Probe

    @property
    def compute_factor(self) -> float:
        """Forward-backward units relative to ``full`` (1 + recomputed share / 3)."""
        n = self.kept_chunks + self.recomputed_chunks
        return 1.0 + (self.recomputed_chunks / n if n else 0.0) / 3.0

    def describe(self) -> str:
        return (f"auto: keeping the graphs of {self.kept_chunks} chunk(s) ({self.kept_tiles} tiles), recomputing "
                f"{self.recomputed_chunks}; predicted peak {format_bytes(self.predicted_peak_bytes)} of a "
                f"{format_bytes(self.budget_bytes)} budget; compute x{self.compute_factor:.2f} of full")


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Probe]]" = weakref.WeakKeyDictionary()


def _measure(module: nn.Module, sample: torch.Tensor, device: torch.device,
             amp_dtype: torch.dtype | None, *extra: torch.Tensor) -> tuple[int, int, int]:
    """(bytes held for backward after ``module(sample, *extra)``, peak bytes during it, the output's last
    dimension) under a forked RNG, with the module's buffers restored afterwards."""
    from fullslide.engine.memory import SavedTensorMeter
    from fullslide.engine.recompute import autocast_ctx

    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            with torch.enable_grad(), autocast_ctx(device, amp_dtype):
                out = module(sample, *extra)
            torch.cuda.synchronize(device)
            held = torch.cuda.memory_allocated(device) - before
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            meter = SavedTensorMeter()
            with meter, torch.enable_grad(), autocast_ctx(device, amp_dtype):
                out = module(sample, *extra)
            held, peak = meter.current_bytes, meter.peak_bytes
        width = int(out.shape[-1]) if isinstance(out, torch.Tensor) else 0
        del out  # frees the probe's graph
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(buffers[name])
    return held, peak, width


def probe_encoder(encoder: nn.Module, tiles: torch.Tensor, *, device: torch.device, amp_dtype: torch.dtype | None,
                  aggregator: nn.Module | None = None) -> Probe:
    """Measure (once, then cached) the graph and transient bytes per tile of ``encoder`` on ``tiles``' shape,
    and of ``aggregator`` per tile (on a few hundred zero features; an aggregator with ``activation_bytes(rows)``
    gives its own model instead)."""
    key = (tuple(tiles.shape[1:]), tiles.dtype, str(device), amp_dtype, encoder.training, id(aggregator))
    cached = _CACHE.setdefault(encoder, {})
    if key in cached:
        return cached[key]
    sample = tiles[:PROBE_TILES].to(device)
    n = int(sample.shape[0])
    held, peak, feature_dim = _measure(encoder, sample, device, amp_dtype)
    transient = max(peak - held, 0) / n
    per_tile, per_chunk = held / n, 0.0
    if n >= 2:  # a second, smaller probe separates what a chunk graph holds per tile from what it holds once
        small = n // 2
        held_small, _, _ = _measure(encoder, sample[:small], device, amp_dtype)
        per_tile = (held - held_small) / (n - small)
        per_chunk = max(0.0, held - n * per_tile)
    agg, agg_fn = 0.0, None
    if aggregator is not None and callable(getattr(aggregator, "activation_bytes", None)):
        agg_fn = aggregator.activation_bytes  # its own model: attention that grows faster than the rows
        agg = agg_fn(256) / 256
    elif aggregator is not None:
        m = 256
        spatial = (torch.stack([torch.arange(m, device=device) % 16, torch.arange(m, device=device) // 16], 1).float(),
                   ) if getattr(aggregator, "uses_positions", False) else ()  # a spatial aggregator: 16-wide grid
        agg_held, _, _ = _measure(aggregator, torch.zeros((m, feature_dim), device=device).requires_grad_(), device, None,
                                  *spatial)
        agg = agg_held / m
    probe = Probe(graph_bytes_per_tile=max(per_tile, 1 / n), transient_bytes_per_tile=transient,
                  feature_dim=feature_dim, source="cuda allocator" if device.type == "cuda" else "saved-tensor hooks",
                  aggregator_bytes_per_tile=agg, graph_bytes_per_chunk=per_chunk, aggregator_bytes_fn=agg_fn)
    cached[key] = probe
    return probe


def available_bytes(device: torch.device) -> int:
    """Free memory now: on CUDA the device's free memory plus what PyTorch's caching allocator holds unused (it
    is ours to reuse; without it the budget would shrink after the first step), else the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # pragma: no cover - non-Linux hosts

    return int(psutil.virtual_memory().available)  # pragma: no cover


def resolve_budget(budget: int | float | str | None, device: torch.device, *, available: int | None = None) -> int:
    """Bytes from ``budget``: None (the default share of free memory), a fraction in (0, 1] of free memory,
    a byte count, or a string such as ``"8GB"`` / ``"512MiB"``. ``available`` replaces the free memory of
    ``device`` (``fullslide plan --device-memory``)."""
    if isinstance(budget, str):
        budget = parse_bytes(budget)
    if budget is None or (isinstance(budget, float) and 0 < budget <= 1):
        free = available_bytes(device) if available is None else available
        return int((DEFAULT_BUDGET_FRACTION if budget is None else budget) * free)
    if budget <= 0 or not math.isfinite(float(budget)):
        raise ValueError(f"memory budget must be > 0 (bytes, a fraction of free memory, or e.g. '8GB'), got {budget}")
    return int(budget)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}  # a bare letter is binary, as in Slurm's --mem=80G


def parse_bytes(text: str) -> int | float:
    """``"80GB"`` -> 80e9, ``"80G"``/``"80GiB"`` -> 80 * 2**30, ``"512 MiB"`` -> 2**29, ``"0.5"`` -> 0.5 (a fraction);
    ValueError names the text."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt](?:i?b)?|b)?\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a memory size (e.g. 80GB, 512MiB, 0.5 for half the free memory)")
    value, unit = float(match.group(1)), match.group(2) or ""
    if not unit and value <= 1:
        return value
    return int(value * _UNITS[unit])


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def activation_bytes(probe: Probe, *, kept_tiles: int, chunk_tiles: int, total_tiles: int,
                     aggregator_tiles: int, kept_chunks: int | None = None) -> int:
    """Predicted peak of the activations one rank's step holds for backward: the kept graphs plus the larger of
    the aggregator's ``aggregator_tiles`` and one chunk's transient (pass 1 and the aggregator run while the kept
    graphs are alive) - or one chunk's graph while it is recomputed, whichever is larger. Chunks are kept in
    slide order, so every kept graph has been backpropagated and freed before any chunk is recomputed."""
    chunk = min(chunk_tiles, max(total_tiles, 1))
    if kept_chunks is None:
        kept_chunks = -(-kept_tiles // max(chunk_tiles, 1))
    kept = kept_tiles * probe.graph_bytes_per_tile + kept_chunks * probe.graph_bytes_per_chunk
    alive = kept + max(probe.aggregator_bytes(aggregator_tiles), chunk * probe.transient_bytes_per_tile)
    recomputed = probe.chunk_graph_bytes(chunk) if kept_tiles < total_tiles else 0.0
    return int(max(alive, recomputed))


def step_bytes(probe: Probe, *, kept_tiles: int, chunk_tiles: int, total_tiles: int, aggregator_tiles: int,
               kept_chunks: int | None = None) -> int:
    """Predicted bytes one rank's step adds: activations plus the features (K x D x 4 bytes x 3)."""
    features = total_tiles * probe.feature_dim * 4 * 3  # features, their gradient, the gathered copy
    return activation_bytes(probe, kept_tiles=kept_tiles, chunk_tiles=chunk_tiles, total_tiles=total_tiles,
                            aggregator_tiles=aggregator_tiles, kept_chunks=kept_chunks) + features


def plan_chunks(probe: Probe, chunk_sizes: list[int], chunk_tiles: int, budget_bytes: int, *,
                aggregator_tiles: tuple[int, int] = (0, 0)) -> AutoPlan:
    """Keep chunks in order while the predicted step stays within ``budget_bytes``. ``aggregator_tiles`` is
    (tiles of the aggregator's graph when every chunk is kept, tiles it holds when it is streamed)."""
    total = sum(chunk_sizes)

    def predicted(kept_tiles: int, kept: int, fn=step_bytes) -> int:
        agg = aggregator_tiles[0] if kept_tiles == total else aggregator_tiles[1]
        return fn(probe, kept_tiles=kept_tiles, chunk_tiles=chunk_tiles, total_tiles=total, aggregator_tiles=agg,
                  kept_chunks=kept)

    kept_tiles = kept = 0
    if predicted(total, len(chunk_sizes)) <= budget_bytes:
        kept_tiles, kept = total, len(chunk_sizes)
    else:
        for size in chunk_sizes[:-1]:
            if predicted(kept_tiles + size, kept + 1) > budget_bytes:
                break
            kept_tiles, kept = kept_tiles + size, kept + 1
    return AutoPlan(kept_chunks=kept, recomputed_chunks=len(chunk_sizes) - kept, kept_tiles=kept_tiles,
                    total_tiles=total, budget_bytes=budget_bytes, predicted_peak_bytes=predicted(kept_tiles, kept),
                    predicted_activation_bytes=predicted(kept_tiles, kept, activation_bytes), probe=probe)


def choose_chunk_tiles(probe: Probe, budget_bytes: int, k_max: int) -> int:
    """``chunk_tiles: auto``: the largest power of two from 8 to 512 (and not above K) whose chunk - its graph
    and transient - takes at most an eighth of the budget, so that most of the budget can keep graphs."""
    per_tile = probe.graph_bytes_per_tile + probe.transient_bytes_per_tile
    chunk = 8
    while chunk * 2 <= min(512, max(k_max, 8)) and probe.graph_bytes_per_chunk + chunk * 2 * per_tile <= budget_bytes / 8:
        chunk *= 2
    return chunk


#: Forward-backward units relative to ``full`` (forward 1, backward 2; recomputing repeats a forward).
MODE_COMPUTE = {"full": 1.0, "checkpoint": 4 / 3, "recompute": 4 / 3}


def mode_activation_bytes(probe: Probe, mode: str, *, tiles: int, chunk_tiles: int, aggregator_chunk_tiles: int,
                          streams: bool, budget_bytes: int | None = None) -> tuple[int, int, float]:
    """(predicted activation bytes, predicted step bytes, compute factor) of one rank's step of ``tiles`` tiles
    in ``mode``; ``streams``: the aggregator is attention pooling (streamed when chunks are recomputed)."""
    sizes = [min(chunk_tiles, tiles - s) for s in range(0, tiles, chunk_tiles)]
    streamed = min(aggregator_chunk_tiles, tiles) if streams else tiles
    if mode == "auto":
        plan = plan_chunks(probe, sizes, chunk_tiles, budget_bytes or 0, aggregator_tiles=(tiles, streamed))
        return plan.predicted_activation_bytes, plan.predicted_peak_bytes, plan.compute_factor
    kept = tiles if mode == "full" else 0
    agg = streamed if mode == "recompute" else tiles
    kwargs = dict(kept_tiles=kept, chunk_tiles=chunk_tiles, total_tiles=tiles, aggregator_tiles=agg)
    return activation_bytes(probe, **kwargs), step_bytes(probe, **kwargs), MODE_COMPUTE[mode]


def largest_k(probe: Probe, mode: str, *, budget_bytes: int, chunk_tiles: int, aggregator_chunk_tiles: int,
              streams: bool, limit: int = 10_000_000) -> int:
    """The largest tiles per rank-step whose predicted step bytes fit ``budget_bytes`` in ``mode`` (auto always
    fits what recompute fits: its answer is recompute's)."""
    mode = "recompute" if mode == "auto" else mode

    def fits(k: int) -> bool:
        return mode_activation_bytes(probe, mode, tiles=k, chunk_tiles=chunk_tiles,
                                     aggregator_chunk_tiles=aggregator_chunk_tiles, streams=streams)[1] <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
