"""Reading tiles (or precomputed features) ahead of the step, in loader worker processes.

``StepDataset`` item ``i`` is this rank's data for step ``i`` of an epoch plan: for each slide of the step
that its slide group processes, only this rank's share of the K tiles (``rank_tile_range``), as read
(augmentation runs batched on the encoder's device: ``fullslide.data.augment.augment_batch``).
``SlideChunks`` streams ALL tiles of slides chunk by chunk for validation, evaluation, extraction and
heatmaps. Both run in a ``torch.utils.data.DataLoader`` so reading overlaps compute. A slide that fails to
read becomes a failure entry (one line naming the file), never an exception that kills the run.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fullslide.data.sampler import StepPlan
from fullslide.engine.mesh import ParallelDims, rank_tile_range, slides_for_group

_OPEN_SLIDES = 8  # slide handles kept open per worker


@dataclass(frozen=True)
class SlideSource:
    """Where one slide's pixels (or features) and tile coordinates live."""

    slide_id: str
    path: str
    n_tiles: int
    coords_h5: str | None = None
    features_h5: str | None = None
    mpp: float | None = None
    stain: Mapping[str, Any] | None = None  # this slide's fitted stain statistics (data.stain_normalize)


def tile_positions(source: SlideSource) -> torch.Tensor:
    """Every tile's place on the slide's tile grid, float32 ``[N, 2]``: level-0 (x, y) / the tile's level-0 side
    (what a spatial aggregator receives), in the order of the slide's coordinates file."""
    from fullslide.slides import read_coords

    coords, geometry = read_coords(source.coords_h5)
    return torch.from_numpy(np.asarray(coords, dtype=np.float64) / float(geometry.level0_px)).float()


class SlidePositions:
    """The grid positions of some slides' tiles (:func:`tile_positions`), read once per slide, for a spatial
    aggregator: ``positions(slide)`` for all of a slide's tiles, ``positions(slide, tiles)`` for some."""

    def __init__(self, sources: Sequence[SlideSource]) -> None:
        self.sources = list(sources)
        self._grids: dict[int, torch.Tensor] = {}

    def __call__(self, slide: int, tiles: np.ndarray | None = None) -> torch.Tensor:
        grid = self._grids.get(slide)
        if grid is None:
            grid = self._grids[slide] = tile_positions(self.sources[slide])
        return grid if tiles is None else grid[torch.as_tensor(np.asarray(tiles), dtype=torch.long)]


def _one_line(exc: BaseException, source: SlideSource) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if source.path in text or source.slide_id in text else f"{source.path}: {text}"


class TileReader:
    """Per-process cache of open slides and their coordinates; reads tiles or feature rows by index."""

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend
        self._slides: OrderedDict[str, Any] = OrderedDict()
        self._coords: dict[str, tuple[np.ndarray, Any]] = {}

    def _slide(self, source: SlideSource):  # -> (Slide, coords, geometry)
        from fullslide.slides import open_slide, read_coords

        if source.slide_id not in self._coords:
            self._coords[source.slide_id] = read_coords(source.coords_h5)
        slide = self._slides.pop(source.slide_id, None)
        if slide is None:
            slide = open_slide(source.path, backend=self.backend, mpp=source.mpp)
        self._slides[source.slide_id] = slide  # most recently used last
        while len(self._slides) > _OPEN_SLIDES:
            self._slides.popitem(last=False)[1].close()
        coords, geometry = self._coords[source.slide_id]
        return slide, coords, geometry

    def tiles(self, source: SlideSource, indices: np.ndarray) -> torch.Tensor:
        """uint8 [k, 3, tile_px, tile_px] tiles at ``indices`` of the slide's coords (channels first, as read)."""
        slide, coords, geometry = self._slide(source)
        return torch.from_numpy(slide.read_tiles(coords[indices], geometry, channels_first=True))

    def features(self, source: SlideSource, indices: np.ndarray) -> np.ndarray:
        """float32 [k, D] rows of the slide's feature file."""
        import h5py

        unique, inverse = np.unique(indices, return_inverse=True)  # h5py needs increasing indices
        with h5py.File(source.features_h5, "r") as h5:
            rows = h5["features"][unique]
        return np.asarray(rows, dtype=np.float32)[inverse]

    def close(self) -> None:
        for slide in self._slides.values():
            slide.close()
        self._slides.clear()


@dataclass
class LoadedStep:
    """This rank's data for one step; ``positions`` index the step's slides (rows of its targets)."""

    step: int
    positions: list[int] = field(default_factory=list)
    data: list[torch.Tensor] = field(default_factory=list)  # [k, 3, H, W] uint8 tiles or [k, D] features
    k_totals: list[int] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)  # (position, one-line message)

    def pin_memory(self) -> "LoadedStep":
        """Called by the DataLoader when ``pin_memory=True`` (CUDA): page-locked tiles copy asynchronously."""
        self.data = [d.pin_memory() for d in self.data]
        return self


@dataclass
class LoadedPart:
    """A piece of one slide's share for one step: at most ``part_tiles`` tiles, so what is in flight is bounded."""

    step: int
    position: int
    data: torch.Tensor | None  # [k, 3, H, W] uint8 tiles or [k, D] features; None when reading failed
    k_total: int
    error: str = ""

    def pin_memory(self) -> "LoadedPart":
        """Called by the DataLoader when ``pin_memory=True`` (CUDA): page-locked tiles copy asynchronously."""
        if self.data is not None:
            self.data = self.data.pin_memory()
        return self


class StepDataset(Dataset):
    """Item ``i``: one part (at most ``part_tiles`` tiles) of this rank's share of a slide of a step.

    Steps are read as several parts so that loader workers share a big step (K = 20,000 tiles) and the memory
    in flight is counted in tiles (``parts in flight x part_tiles``), not in steps; :func:`assemble_steps` puts
    the parts of each step back together, in order.
    """

    def __init__(
        self,
        plans: Sequence[StepPlan],
        sources: Sequence[SlideSource],
        *,
        dims: ParallelDims,
        rank: int,
        chunk_tiles: int,
        use_features: bool = False,
        backend: str = "auto",
        part_tiles: int = 1024,
    ) -> None:
        self.plans = list(plans)
        self.sources = list(sources)
        self.use_features = use_features
        self.reader = TileReader(backend)
        tp_rank, tp_size = dims.tp_rank(rank), dims.tile_parallel
        self.parts: list[tuple[int, int, int, int]] = []  # (plan index, position, start, stop)
        self.parts_per_step: list[int] = []
        self.step_tiles = 0  # this rank's tiles in its largest step
        for i, plan in enumerate(self.plans):
            before = len(self.parts)
            for pos in slides_for_group(len(plan.slides), dims.slide_groups, dims.group_of(rank)):
                start, stop = rank_tile_range(len(plan.tiles[pos]), chunk_tiles, tp_rank, tp_size)
                cuts = list(range(start, stop, max(1, part_tiles))) or [start]
                self.parts += [(i, pos, a, min(a + part_tiles, stop)) for a in cuts]
            self.parts_per_step.append(len(self.parts) - before)
            self.step_tiles = max(self.step_tiles, sum(b - a for _, _, a, b in self.parts[before:]))

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> LoadedPart:
        plan_index, pos, start, stop = self.parts[i]
        plan = self.plans[plan_index]
        source, tiles = self.sources[plan.slides[pos]], plan.tiles[pos]
        try:
            if self.use_features:
                data = torch.from_numpy(self.reader.features(source, tiles[start:stop]))
            else:
                data = self.reader.tiles(source, tiles[start:stop])
        except Exception as exc:  # one bad slide must not stop the run: report it, skip it this step
            return LoadedPart(plan.step, pos, None, len(tiles), _one_line(exc, source))
        return LoadedPart(plan.step, pos, data, len(tiles))


def assemble_steps(parts: Iterable[LoadedPart], dataset: StepDataset) -> Iterator[LoadedStep]:
    """The parts yielded in order by a loader over ``dataset``, joined into one :class:`LoadedStep` per step."""
    it = iter(parts)
    for plan, n_parts in zip(dataset.plans, dataset.parts_per_step):
        out = LoadedStep(step=plan.step)
        pieces: dict[int, list[torch.Tensor]] = {}
        k_totals: dict[int, int] = {}
        errors: dict[int, str] = {}
        for _ in range(n_parts):
            part = next(it)
            k_totals[part.position] = part.k_total
            if part.error:
                errors.setdefault(part.position, part.error)
            else:
                pieces.setdefault(part.position, []).append(part.data)
        for pos in k_totals:
            if pos in errors:
                out.failures.append((pos, errors[pos]))
                continue
            chunks = pieces.get(pos, [])
            out.positions.append(pos)
            out.data.append(chunks[0] if len(chunks) == 1 else torch.cat(chunks))
            out.k_totals.append(k_totals[pos])
        yield out


def default_prefetch_tiles(tile_bytes: int, step_tiles: int, fraction: float = 0.25) -> int:
    """Tiles the loader may hold in flight: one step's worth (so, with the step being trained on, about two steps
    are in memory), and never more than ``fraction`` of the memory available now (Linux ``MemAvailable``)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in fh if ln.split()}
        available = info.get("MemAvailable", 0)
    except (OSError, ValueError, IndexError):
        available = 0
    ram_tiles = max(1, int(available * fraction) // max(1, tile_bytes)) if available else 65_536
    return max(1, min(ram_tiles, step_tiles))


def prefetch_per_worker(prefetch_tiles: int, part_tiles: int, workers: int) -> int:
    """Parts each worker may read ahead so that ``workers x prefetch x part_tiles`` <= ``prefetch_tiles`` (>= 1)."""
    return max(1, prefetch_tiles // max(1, part_tiles * max(1, workers)))


@dataclass
class SlideChunk:
    """One chunk of a slide's tiles, in order; ``error`` set (and ``data`` empty) when reading failed."""

    slide: int
    chunk: int
    n_chunks: int
    data: torch.Tensor
    error: str = ""


class SlideChunks(Dataset):
    """Every tile of every slide, in order, ``chunk_tiles`` at a time (for inference on ALL tiles)."""

    def __init__(self, sources: Sequence[SlideSource], chunk_tiles: int, backend: str = "auto",
                 use_features: bool = False, ranges: Sequence[tuple[int, int]] | None = None) -> None:
        """``ranges`` (one ``[start, stop)`` per source, starts on chunk boundaries): read only those tiles, as a
        rank of a tile-parallel group does; a source with an empty range still yields one empty item, so every
        rank of the group sees every slide."""
        self.sources = list(sources)
        self.reader = TileReader(backend)
        self.use_features = use_features
        self.ranges = list(ranges) if ranges is not None else [(0, src.n_tiles) for src in self.sources]
        self.index = []
        for s, (start, stop) in enumerate(self.ranges):
            n = -(-(stop - start) // chunk_tiles)
            self.index += [(s, c, n) for c in range(n)] if n else [(s, -1, 0)]
        self.chunk_tiles = chunk_tiles

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> SlideChunk:
        s, c, n = self.index[i]
        source = self.sources[s]
        if c < 0:  # this rank holds no tile of the slide
            return SlideChunk(s, c, n, torch.empty(0))
        start, stop = self.ranges[s]
        idx = np.arange(start + c * self.chunk_tiles, min(start + (c + 1) * self.chunk_tiles, stop))
        try:
            if self.use_features:
                data = torch.from_numpy(self.reader.features(source, idx))
            else:
                data = self.reader.tiles(source, idx)
        except Exception as exc:
            return SlideChunk(s, c, n, torch.empty(0), _one_line(exc, source))
        return SlideChunk(s, c, n, data)


def _as_is(item: Any) -> Any:
    return item


def ignore_stop_signals(worker_id: int = 0) -> None:
    """Loader workers ignore SIGINT and SIGTERM. Slurm (time limit, preemption, scancel), ``timeout`` and Ctrl-C
    in a terminal signal the whole process group: a worker that died of it would take the step in flight with
    it. The main process acts on the signal at the next step boundary and shuts its workers down itself (the
    DataLoader's sentinel; a worker whose parent is gone exits by the DataLoader's own watchdog)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # the parent started this worker with the stop signals blocked (see _StopSafeLoader): one that arrived since
    # is pending, and setting SIG_IGN above discarded it; only now may they be delivered (and ignored)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


class _StopSafeLoader(DataLoader):
    """A DataLoader whose workers start with SIGINT/SIGTERM blocked: between a worker's start and its
    ``worker_init_fn`` torch installs a SIGTERM handler that kills the worker, so a signal to the process group at
    that moment (Slurm's, at the start of an epoch) would take the step with it. Blocked, the signal waits in the
    worker until :func:`ignore_stop_signals` ignores it, and in the main process until its handler acts on it."""

    def __iter__(self):  # type: ignore[override]
        import signal
        import threading

        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super().__iter__()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            return super().__iter__()  # starts (forks) the workers
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def make_loader(dataset: Dataset, *, workers: int, prefetch: int = 2, pin_memory: bool = False) -> DataLoader:
    """A DataLoader that yields the dataset's items one by one, in order, read ahead by ``workers``."""
    return _StopSafeLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        prefetch_factor=prefetch if workers > 0 else None,
        pin_memory=pin_memory,
        collate_fn=_as_is,
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
    )
