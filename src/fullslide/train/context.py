"""Whole-slide context at the cost of K (``train.context: cache``): a feature cache of every tile of every training
slide, so that the aggregator sees the whole slide each step while the encoder back-propagates through K tiles.

``RUN/context/`` holds, per training slide, the features ``[N, D]`` of all N tiles of its coords (float16 by
default), one safetensors file per *version*. Versions follow the global step index ``g`` (steps taken so far):
an extraction of every tile before step ``p`` (at the start: the initial encoder; then every
``train.context_refresh_epochs`` epochs; chunked, no graph, tile-parallel under torchrun like inference) is
version ``2p + 1``; step ``g`` writes version ``2(g + 1)`` (its K fresh features, detached, replace their rows).
Step ``g`` reads the newest version at or below ``2g + 1``.

Exact resume: files are written atomically (temporary name, then rename); a checkpoint before step ``p`` keeps,
per slide, the newest version at or below ``2p`` (older ones are deleted), and resuming from it deletes every
version above ``2p`` (an extraction at ``p`` is redone). So the cache a resumed run reads is the one the
uninterrupted run read, whether it was stopped by a signal or by ``kill -9`` in the middle of a write. Only the
rows of the step's slides are in memory.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from fullslide.atomic import atomic_path
from fullslide.train.checkpoint import save_file

log = logging.getLogger("fullslide.train")

CONTEXT_DIR = "context"
_NAME = re.compile(r"^(?P<slide>.+)@(?P<version>\d{9})\.safetensors$")


class ContextCache:
    """The versioned feature cache of one run (module docstring). Any rank reads; the caller picks one writer per
    slide. The folder is the index (scanned per read: another rank may have written since), so ranks that share
    the run folder see each other's versions; a step's writes are ordered before the next step's reads by the
    collective every step begins with."""

    def __init__(self, run_dir: Path, dtype: torch.dtype = torch.float16) -> None:
        self.folder = Path(run_dir) / CONTEXT_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype

    def path(self, slide_id: str, version: int) -> Path:
        return self.folder / f"{slide_id}@{version:09d}.safetensors"

    def all_versions(self) -> dict[str, list[int]]:
        """Slide id -> its versions, ascending."""
        out: dict[str, list[int]] = {}
        for entry in os.scandir(self.folder):
            m = _NAME.match(entry.name)
            if m:
                out.setdefault(m["slide"], []).append(int(m["version"]))
        return {k: sorted(v) for k, v in out.items()}

    def versions(self, slide_id: str) -> list[int]:
        prefix = slide_id + "@"
        return sorted(int(m["version"]) for e in os.scandir(self.folder)
                      if e.name.startswith(prefix) and (m := _NAME.match(e.name)) and m["slide"] == slide_id)

    def read(self, slide_id: str, step: int) -> torch.Tensor | None:
        """Features ``[N, D]`` of every tile of the slide as step ``step`` sees them (in the cache's dtype: the
        engine casts the context rows on the device), or None."""
        from safetensors.torch import load_file

        older = [v for v in self.versions(slide_id) if v <= 2 * step + 1]
        if not older:
            return None
        return load_file(str(self.path(slide_id, older[-1])))["features"]

    def write(self, slide_id: str, version: int, rows: torch.Tensor) -> None:
        """Store ``rows`` ``[N, D]`` as ``version`` of the slide, atomically."""
        with atomic_path(self.path(slide_id, version)) as tmp:
            save_file({"features": rows.detach().to("cpu", self.dtype).contiguous()}, str(tmp))

    def write_step(self, slide_id: str, step: int, rows: torch.Tensor) -> None:
        """The slide's rows after step ``step`` (its fresh features in place)."""
        self.write(slide_id, 2 * (step + 1), rows)

    def rollback(self, position: int) -> int:
        """Delete what was written after the checkpoint before step ``position``; returns how many versions."""
        doomed = [(s, v) for s, vs in self.all_versions().items() for v in vs if v > 2 * position]
        for slide_id, v in doomed:
            self.path(slide_id, v).unlink(missing_ok=True)
        return len(doomed)

    def prune(self, position: int) -> None:
        """After a checkpoint before step ``position``: keep per slide the version it reads and any newer one."""
        for slide_id, versions in self.all_versions().items():
            older = [v for v in versions if v <= 2 * position]
            for v in older[:-1]:
                self.path(slide_id, v).unlink(missing_ok=True)


def fill(cache: ContextCache, encoder: torch.nn.Module, sources: list, position: int, *, chunk_tiles: int,
         workers: int, amp_dtype: torch.dtype | None, backend: str, parallel, write: bool, stain=None) -> int:
    """Extract the features of every tile of ``sources`` into the cache as the extraction before step
    ``position``. Every rank takes part (tile-parallel); ``write`` ranks store. Returns how many slides were
    extracted. The encoder is left in eval mode: the caller puts it back in training."""
    from fullslide.train.inference import extract_features

    version = 2 * position + 1
    done = 0
    for source, feats, error in extract_features(encoder, sources, chunk_tiles=chunk_tiles, workers=workers,
                                                 amp_dtype=amp_dtype, backend=backend, parallel=parallel, stain=stain):
        if feats is None:
            log.warning("context: %s has no cached features (%s); it trains without context", source.slide_id, error)
            continue
        if write:
            cache.write(source.slide_id, version, feats)
        done += 1
    return done


def context_rows(rows: torch.Tensor, sampled: np.ndarray) -> torch.Tensor:
    """The cached rows of the tiles a step did not sample: ``rows`` ``[N, D]`` without ``sampled`` (with repeats
    when the slide has fewer than K tiles), in tile order."""
    keep = torch.ones(rows.shape[0], dtype=torch.bool)
    keep[torch.as_tensor(sampled, dtype=torch.long)] = False
    return rows[keep]


def replace_rows(rows: torch.Tensor, sampled: np.ndarray, fresh: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """``rows`` with the sampled tiles' rows replaced by their fresh features ``[K, D]`` (a tile drawn twice takes
    its last draw's row); ``in_place`` writes into ``rows`` (the trainer's own copy: no second [N, D] buffer)."""
    index = np.asarray(sampled)
    _, last = np.unique(index[::-1], return_index=True)
    pick = len(index) - 1 - last  # the last occurrence of each tile
    out = rows if in_place else rows.clone()
    out[torch.as_tensor(index[pick], dtype=torch.long)] = fresh[torch.as_tensor(pick, dtype=torch.long)].to(out)
    return out


class SlideContext:
    """``train.context: cache`` inside a training run: the cache (rolled back to the checkpoint when resuming,
    filled for the slides that have none), each step's context rows, the write-back after the step, and the
    refresh every ``train.context_refresh_epochs`` epochs. ``trainer`` is the running
    :class:`~fullslide.train.trainer.Trainer` (its config, context, model, state and training slides)."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        cfg = trainer.config
        self.cache = ContextCache(trainer.run_dir, torch.float16 if cfg.train.context_dtype == "float16" else torch.float32)
        if trainer.rank0 and (removed := self.cache.rollback(trainer.state["global_step"])):
            log.info("context: removed %d cache version(s) newer than the checkpoint", removed)
        self.fill(missing_only=True)

    def refresh_due(self, epoch: int, start_step: int) -> bool:
        every = self.trainer.config.train.context_refresh_epochs
        return bool(every) and epoch > 0 and epoch % every == 0 and start_step == 0

    def fill(self, *, missing_only: bool = False) -> None:
        """Extract every tile's features of the training slides (all, or those without any cache) before the
        next step; every rank takes part."""
        from fullslide.train.setup import barrier

        t, cfg = self.trainer, self.trainer.config
        barrier(t.ctx)  # COLLECTIVE (world): every rank sees the same files before choosing what to extract
        present = self.cache.all_versions()
        todo = [s for s in t.train_src if not (missing_only and present.get(s.slide_id))]
        if todo:
            t0 = time.perf_counter()
            n = fill(self.cache, t.model.encoder, todo, t.state["global_step"], chunk_tiles=cfg.eval.chunk_tiles,
                     workers=cfg.train.loader_workers, amp_dtype=t.amp, backend=cfg.data.backend, parallel=t.ctx,
                     write=t.ctx.tp_rank == 0, stain=t.data.stain)
            t.model.train()
            if t.rank0:
                log.info("context: features of every tile of %d slide(s) cached before step %d in %.0f s", n,
                         t.state["global_step"] + 1, time.perf_counter() - t0)
        barrier(t.ctx)  # COLLECTIVE (world): the files exist before any rank reads them

    def attach(self, bags: list, positions: list[int], plan, new_index: dict[int, int]) -> list[tuple]:
        """Give each bag the cached rows of the tiles this step did not sample (read after the step-start
        collective, so every write of the previous step is there); returns what ``write_back`` needs."""
        t = self.trainer
        pending = []
        for p in positions:
            if p not in new_index:
                continue
            slide_id = t.train_ids[plan.slides[p]]
            rows = self.cache.read(slide_id, t.state["global_step"])  # [N, D]
            if rows is None:
                continue
            bags[new_index[p]].context = context_rows(rows, plan.tiles[p]).to(t.ctx.device, non_blocking=True)
            if t.positions is not None:  # a spatial aggregator: the context rows' places, in the same order
                bags[new_index[p]].context_positions = context_rows(t.positions(plan.slides[p]), plan.tiles[p])
            pending.append((new_index[p], slide_id, rows, plan.tiles[p]))
        return pending

    def write_back(self, pending: list[tuple], result) -> None:
        """The K fresh rows (gathered: the group's K) replace their cache rows; one writer per slide group."""
        if self.trainer.ctx.tp_rank != 0:
            return
        for index, slide_id, rows, sampled in pending:
            fresh = result.fresh_features[index].cpu()  # [K, D]
            self.cache.write_step(slide_id, self.trainer.state["global_step"],
                                  replace_rows(rows, sampled, fresh, in_place=True))
