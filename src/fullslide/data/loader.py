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
from typing import Any, Sequence

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


class StepDataset(Dataset):
    """Item ``i``: this rank's share of every slide its group takes in ``plans[i]``."""

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
    ) -> None:
        self.plans = list(plans)
        self.sources = list(sources)
        self.dims, self.rank = dims, rank
        self.chunk_tiles = chunk_tiles
        self.use_features = use_features
        self.reader = TileReader(backend)

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int) -> LoadedStep:
        plan = self.plans[i]
        out = LoadedStep(step=plan.step)
        tp_rank, tp_size = self.dims.tp_rank(self.rank), self.dims.tile_parallel
        for pos in slides_for_group(len(plan.slides), self.dims.slide_groups, self.dims.group_of(self.rank)):
            slide_index, tiles = plan.slides[pos], plan.tiles[pos]
            source = self.sources[slide_index]
            start, stop = rank_tile_range(len(tiles), self.chunk_tiles, tp_rank, tp_size)
            try:
                if self.use_features:
                    data = torch.from_numpy(self.reader.features(source, tiles[start:stop]))
                else:
                    data = self.reader.tiles(source, tiles[start:stop])
            except Exception as exc:  # one bad slide must not stop the run: report it, skip it this step
                out.failures.append((pos, _one_line(exc, source)))
                continue
            out.positions.append(pos)
            out.data.append(data)
            out.k_totals.append(len(tiles))
        return out


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


def make_loader(dataset: Dataset, *, workers: int, prefetch: int = 2, pin_memory: bool = False) -> DataLoader:
    """A DataLoader that yields the dataset's items one by one, in order, read ahead by ``workers``."""
    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        prefetch_factor=prefetch if workers > 0 else None,
        pin_memory=pin_memory,
        collate_fn=_as_is,
    )
