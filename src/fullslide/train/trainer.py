"""``fullslide train``: end-to-end (or frozen-feature) training with the exact engine.

Per epoch: a seeded plan of steps (``TileSampler``), tiles read ahead by loader workers (each rank only its
share), ``engine.step`` for the exact gradient of the mean slide loss, AdamW with warm-up + cosine and separate
encoder / aggregator learning rates, validation on ALL tiles of every validation slide, best-checkpoint
selection and early stopping, metrics.csv + TensorBoard, a checkpoint every epoch. Ctrl-C saves a checkpoint
at the current step; ``--resume RUN_DIR`` continues from it and replays the same steps an uninterrupted run
would have taken. Runs unchanged under torchrun (``train.tile_parallel`` ranks share each slide).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fullslide.data.augment import Augment, augment_batch
from fullslide.data.loader import (SlidePositions, StepDataset, assemble_steps, default_prefetch_tiles, make_loader,
                                   prefetch_per_worker)
from fullslide.data.sampler import TileSampler, step_seed
from fullslide.engine import (Bag, NonFiniteLossError, ParallelContext, init_parallel, rank_tile_range,
                              shutdown_parallel, step)
from fullslide.atomic import atomic_write_text
from fullslide.errors import ConfigError, FullslideError
from fullslide.train import checkpoint as ckpt
from fullslide.train.config import (Config, check_resume_overrides, dump_yaml, load_run_config,
                                    portable_config)
from fullslide.train.faults import (StopFlag, StopRequested, deferred_interrupt, disk_errors, is_comm_failure,
                                    lost_ranks, peers_of)
from fullslide.train.context import SlideContext
from fullslide.train.logs import RunLogger, progress_bar, write_metrics_csv
from fullslide.train.runlock import RunLock
from fullslide.train.setup import amp_dtype, build_model, check_trainable, prepare_data, write_run_info
from fullslide.train.optim import make_optimizer, make_scheduler
from fullslide.train.validate import evaluate_sources, selection

log = logging.getLogger("fullslide.train")


class TargetTable:
    """Training targets by slide id (class index, (time, event) or value), built once per run."""

    def __init__(self, cohort) -> None:
        self.values = torch.as_tensor(cohort.targets(),
                                      dtype=torch.long if cohort.task == "classification" else torch.float32)
        self.row = {r.slide_id: i for i, r in enumerate(cohort.records)}

    def __call__(self, slide_ids: list[str]) -> torch.Tensor:
        return self.values[[self.row[s] for s in slide_ids]]


def _class_weights(config: Config, targets: TargetTable, train_ids: list[str], n_classes: int) -> list[float] | None:
    from fullslide.train.losses import balanced_class_weights

    spec = config.train.class_weights
    if spec == "balanced":
        return list(balanced_class_weights(targets(train_ids).numpy(), n_classes))
    return spec


def _agree(ctx: ParallelContext, n: int, failures: list[tuple[int, str]], stop: bool) -> tuple[list[int], bool]:
    """(positions of the step's slides that failed on ANY rank, whether ANY rank was asked to stop).

    All ranks must drop the same slides and stop before the same step, or a collective would hang.
    """
    flags = torch.zeros(n + 1, dtype=torch.int32)
    for pos, message in failures:
        flags[pos] = 1
        log.warning("slide skipped this epoch: %s", message)
    flags[n] = int(stop)
    if ctx.distributed:
        import torch.distributed as dist

        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # COLLECTIVE (world): failed slides + Ctrl-C, once per step
    return [i for i in range(n) if flags[i]], bool(flags[n])


class Trainer:
    """One training run; ``run()`` returns the run folder."""

    def __init__(self, config: Config | None = None, *, resume: str | Path | None = None, progress: bool = True,
                 overrides: tuple[str, ...] = ()) -> None:
        if resume is not None:
            run_dir = Path(resume)
            if not (run_dir / "config.yaml").exists():
                raise FullslideError(f"{run_dir}: cannot resume, no config.yaml (not a fullslide run folder)")
            check_resume_overrides(overrides)
            config = load_run_config(run_dir, overrides)
        if config is None:
            raise FullslideError("train: a config (or --resume RUN_DIR) is required")
        self.config = config
        self.run_dir = Path(config.run_dir) if resume is None else Path(resume)
        self.resuming = resume is not None
        self.progress = progress
        self.stop = StopFlag()
        try:
            self.ctx = init_parallel(config.train.tile_parallel, device=config.train.device)
        except ValueError as exc:  # tile_parallel does not divide the world
            raise ConfigError(f"config key 'train.tile_parallel': {exc}") from None
        self.rank0 = self.ctx.rank == 0
        self.peers = peers_of(self.ctx)  # (host, pid) of every rank, to name a rank that dies
        self.lock: RunLock | None = None
        if self.rank0:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.lock = RunLock(self.run_dir)  # one writer per run folder
            except OSError as exc:
                raise FullslideError(f"{self.run_dir}: cannot write the run folder ({exc.strerror or exc})") from None
        if not self.resuming and (self.run_dir / "checkpoints" / "last.json").exists():
            raise FullslideError(f"{self.run_dir}: holds a run already; continue it with --resume {self.run_dir} "
                                 "or choose another run_dir")
        if self.rank0:
            if self.resuming and (removed := ckpt.remove_stale(self.run_dir)):
                log.info("removed %d temporary file(s) an interrupted run left in %s", removed, self.run_dir)
            with disk_errors(self.run_dir):
                atomic_write_text(self.run_dir / "config.yaml", dump_yaml(portable_config(config, self.run_dir)))

    # ---- setup ---------------------------------------------------------------------------------------
    def _setup(self) -> None:
        from fullslide.train.losses import make_loss, n_outputs

        cfg, ctx = self.config, self.ctx
        self.data = prepare_data(cfg, self.run_dir, ctx, progress=self.progress and self.rank0)
        check_trainable(self.data, cfg.data.task)
        self.train_src = self.data.split_sources("train")
        self.val_src = self.data.split_sources("val")
        if not self.train_src:
            raise FullslideError(f"{cfg.data.cohort}: no usable training slide (see the warnings above)")
        self.train_ids = [s.slide_id for s in self.train_src]
        self.classes = self.data.cohort.classes
        self.n_out = n_outputs(cfg.data.task, len(self.classes))
        self.model = build_model(cfg, self.n_out).to(ctx.device)
        if cfg.encoder.freeze:
            self.model.encoder.requires_grad_(False)
            width = self.data.feature_width
            if width is not None and width != self.model.feature_dim:  # the aggregator is sized from the encoder
                raise ConfigError(f"{cfg.data.features_dir}: features of width {width}, but encoder "
                                  f"'{cfg.encoder.name}' gives {self.model.feature_dim}: set encoder.name (and kwargs) "
                                  "to the model that extracted them")
        # what the encoder trains when it trains (LoRA / last-N blocks freeze the rest); frozen epochs toggle it
        self.encoder_trainable = [p for p in self.model.encoder.parameters() if p.requires_grad]
        self.amp = amp_dtype(cfg, ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type) if self.amp == torch.float16 else None
        self.targets = TargetTable(self.data.cohort)
        self.loss_fn = make_loss(cfg.data.task, n_classes=len(self.classes),
                                 class_weights=_class_weights(cfg, self.targets, self.train_ids, len(self.classes)))
        self.sampler = TileSampler([s.n_tiles for s in self.train_src], k=cfg.train.tiles_per_slide,
                                   slides_per_step=cfg.train.slides_per_step * ctx.dims.slide_groups,
                                   epoch_fraction=cfg.train.epoch_fraction, seed=cfg.train.seed)
        if cfg.data.task == "survival" and self.sampler.slides_per_step < 2:
            log.warning("survival with 1 slide per step: the Cox loss compares slides within a step, so it is 0; "
                        "raise train.slides_per_step (4 or more)")
        self.optimizer = make_optimizer(cfg, self.model)
        self.scheduler = make_scheduler(cfg, self.optimizer, self.sampler.steps_per_epoch)
        self.state: dict[str, Any] = {"epoch": 0, "next_step": 0, "global_step": 0, "best": None, "best_epoch": None,
                                      "bad_epochs": 0, "history": [], "accum": None}
        if self.resuming:
            where = ckpt.checkpoint_dir(self.run_dir, "last")
            self.state.update(ckpt.load_checkpoint(where, model=self.model, optimizer=self.optimizer,
                                                   scheduler=self.scheduler, scaler=self.scaler))
            log.info("resumed from %s at epoch %d step %d", where, self.state["epoch"] + 1, self.state["next_step"])
        self.chunk_tiles = self._chunk_tiles()
        spatial = getattr(self.model.aggregator, "uses_positions", False)  # the aggregator sees where tiles lie
        self.positions = SlidePositions(self.train_src) if spatial else None
        self.context = SlideContext(self) if cfg.train.context == "cache" else None
        self._plan_logged = False
        if self.rank0:
            write_run_info(self.run_dir, {
                "task": cfg.data.task, "classes": self.classes, "n_outputs": self.n_out, "tile_px": cfg.data.tile_px,
                "target_mpp": cfg.data.target_mpp, "encoder": cfg.encoder.name, "aggregator": cfg.aggregator.name,
                "frozen": cfg.encoder.freeze, "excluded": self.data.excluded,
            })

    def _chunk_tiles(self) -> int:
        """``train.chunk_tiles``, or for ``auto`` the size a probe of the encoder picks - once per run: the
        chunk size is part of the seeding contract, so a resumed run keeps the one it started with."""
        cfg = self.config
        if cfg.train.chunk_tiles != "auto":
            return int(cfg.train.chunk_tiles)
        if self.state.get("chunk_tiles"):
            return int(self.state["chunk_tiles"])
        from fullslide.engine.budget import choose_chunk_tiles, format_bytes, probe_encoder, resolve_budget

        sample = torch.zeros((4, 3, cfg.data.tile_px, cfg.data.tile_px), dtype=torch.uint8)
        probe = probe_encoder(self.model.encoder, sample, device=self.ctx.device, amp_dtype=self.amp)
        budget = resolve_budget(cfg.train.memory_budget, self.ctx.device)
        k = cfg.train.tiles_per_slide if cfg.train.tiles_per_slide != "all" else max(s.n_tiles for s in self.train_src)
        chunk = choose_chunk_tiles(probe, budget, int(k))
        if self.rank0:
            log.info("chunk_tiles auto: %d (%s of activations per tile, budget %s)", chunk,
                     format_bytes(probe.graph_bytes_per_tile + probe.transient_bytes_per_tile), format_bytes(budget))
        self.state["chunk_tiles"] = chunk
        return chunk

    # ---- checkpoints ---------------------------------------------------------------------------------
    def _save(self, name: str, pointers: tuple[str, ...] = ("last",)) -> Path | None:
        if not self.rank0:
            return None
        where = ckpt.save_checkpoint(self.run_dir, name, model=self.model, optimizer=self.optimizer,
                                     scheduler=self.scheduler, scaler=self.scaler, state=self.state, pointers=pointers)
        if self.context is not None:  # the cache as of this checkpoint, and anything newer (none at a save)
            self.context.cache.prune(self.state["global_step"])
        return where

    # ---- one epoch -----------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, ctx = self.config, self.ctx
        encoder_trains = not cfg.encoder.freeze and epoch >= cfg.encoder.frozen_epochs
        self.model.encoder.requires_grad_(False)
        for p in self.encoder_trainable if encoder_trains else ():
            p.requires_grad_(True)
        self.model.train()
        plans = self.sampler.epoch(epoch)
        start = self.state["next_step"]
        if self.context is not None and self.context.refresh_due(epoch, start):
            self.context.fill()  # re-extract with the current encoder
        acc = self.state["accum"] or {"loss_sum": 0.0, "steps": 0, "slides": 0, "tiles": 0, "skipped": 0, "seconds": 0.0}
        aug = Augment(flip=cfg.augment.flip, rot90=cfg.augment.rot90, blur_p=cfg.augment.blur_p, jitter=cfg.augment.jitter,
                      hed_sigma=cfg.augment.hed_sigma, hed_bias=cfg.augment.hed_bias)
        # loader workers only read and decode; augmentation runs batched on the encoder's device (augment_batch)
        dataset = StepDataset(plans[start:], self.train_src, dims=ctx.dims, rank=ctx.rank, chunk_tiles=self.chunk_tiles,
                              use_features=cfg.encoder.freeze, backend=cfg.data.backend,
                              part_tiles=cfg.train.part_tiles)
        tile_bytes = 3 * cfg.data.tile_px**2 if not cfg.encoder.freeze else 4 * 4096  # uint8 tiles / float features
        budget = cfg.train.prefetch_tiles or default_prefetch_tiles(tile_bytes, dataset.step_tiles)
        loader = make_loader(dataset, workers=cfg.train.loader_workers,
                             prefetch=prefetch_per_worker(budget, cfg.train.part_tiles, cfg.train.loader_workers),
                             pin_memory=ctx.device.type == "cuda")
        bar = progress_bar(self.sampler.slides_per_epoch, f"epoch {epoch + 1}/{cfg.train.epochs}",
                           self.progress and self.rank0, initial=acc["slides"] + acc["skipped"])
        tick = time.perf_counter()
        for loaded in assemble_steps(loader, dataset):
            plan = plans[loaded.step]
            self.state["accum"] = acc
            failed_list, stop = _agree(ctx, len(plan.slides), loaded.failures, self.stop.is_set())
            if stop:  # Ctrl-C / SIGTERM: stop before this step, on every rank, with state matching the steps taken
                bar.close()
                raise StopRequested(self.stop.signum)
            failed = set(failed_list)
            keep = [p for p in range(len(plan.slides)) if p not in failed]
            new_index = {p: i for i, p in enumerate(keep)}
            bags = [Bag(index=new_index[p], k_total=k,
                        positions=self.positions(plan.slides[p], plan.tiles[p]) if self.positions else None,
                        **({"features": d} if cfg.encoder.freeze else
                           {"tiles": self._augment(d, k, epoch, plan.slides[p], aug)}))
                    for p, d, k in zip(loaded.positions, loaded.data, loaded.k_totals) if p in new_index]
            acc["skipped"] += len(failed)
            pending = self.context.attach(bags, loaded.positions, plan, new_index) if self.context is not None else []
            if keep:
                ids = [self.train_ids[plan.slides[p]] for p in keep]
                try:
                    result = step(self.model, bags, self.targets(ids), self.loss_fn, mode=cfg.train.mode,
                                  memory_budget=cfg.train.memory_budget, chunk_tiles=self.chunk_tiles,
                                  step_seed=step_seed(cfg.train.seed, epoch, plan.step),
                                  amp_dtype=self.amp, grad_scaler=self.scaler, parallel=ctx)
                except NonFiniteLossError as exc:
                    self.state.update(epoch=epoch, next_step=plan.step)
                    where = self._save(f"e{epoch + 1:04d}_s{plan.step:06d}_lastgood")
                    raise FullslideError(f"non-finite loss at epoch {epoch + 1} step {plan.step + 1} (slides: "
                                         f"{', '.join(ids)}): {exc}; last good state saved to {where}") from exc
                except torch.cuda.OutOfMemoryError as exc:
                    k = max(len(t) for t in plan.tiles)
                    raise FullslideError(
                        f"CUDA out of memory at epoch {epoch + 1} step {plan.step + 1} with K={k} tiles per slide, "
                        f"chunk_tiles={self.chunk_tiles}, mode={cfg.train.mode}: lower train.chunk_tiles or "
                        f"train.memory_budget, use train.mode=recompute, or raise train.tile_parallel "
                        f"(`fullslide plan CONFIG` predicts what fits)") from exc
                if result.plan is not None and not self._plan_logged and self.rank0:
                    log.info("%s (first step; logged once)", result.plan.describe())
                    self._plan_logged = True
                self._optimizer_step()
                if pending:  # after the backward: the K fresh rows replace their cache rows
                    self.context.write_back(pending, result)
                acc["loss_sum"] += result.loss
                acc["steps"] += 1
                acc["slides"] += len(keep)
                acc["tiles"] += sum(len(plan.tiles[p]) for p in keep)
            else:  # every slide of the step failed: no update, but the schedule stays on the planned step count
                self.scheduler.step()
            self.state["next_step"] = plan.step + 1
            self.state["global_step"] += 1
            now = time.perf_counter()
            acc["seconds"] += now - tick
            tick = now
            bar.update(len(plan.slides))
            bar.set_postfix(loss=f"{acc['loss_sum'] / max(1, acc['steps']):.4f}",
                            tiles_s=f"{acc['tiles'] / max(1e-9, acc['seconds']):.0f}")
        bar.close()
        return {
            "epoch": epoch + 1,
            "train_loss": acc["loss_sum"] / max(1, acc["steps"]),
            "lr_encoder": max((g["lr"] for g in self.optimizer.param_groups if g["part"] == "encoder"), default=0.0)
            if encoder_trains else 0.0,
            "lr_aggregator": self.optimizer.param_groups[-1]["lr"],
            "slides_per_s": acc["slides"] / max(1e-9, acc["seconds"]),
            "tiles_per_s": acc["tiles"] / max(1e-9, acc["seconds"]),
            "train_tiles": acc["tiles"],
            "skipped_slides": acc["skipped"],
            "train_seconds": acc["seconds"],
        }

    def _augment(self, tiles: torch.Tensor, k_total: int, epoch: int, slide: int, aug: Augment) -> torch.Tensor:
        """This rank's share of a slide's uint8 tiles, moved to the device and augmented there, each tile keyed by
        its position in the slide's K list (so the pixels do not depend on the layout)."""
        start, stop = rank_tile_range(k_total, self.chunk_tiles, self.ctx.tp_rank, self.ctx.tp_size)
        tiles = tiles.to(self.ctx.device, non_blocking=True)
        if self.data.stain is not None:  # stain normalisation first: augmentation varies the normalised stains
            tiles = self.data.stain(tiles, self.train_src[slide].stain)
        return augment_batch(tiles, aug, seed=self.config.train.seed, epoch=epoch, slide=slide,
                             positions=np.arange(start, stop))

    def _optimizer_step(self) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.config.train.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- the run -------------------------------------------------------------------------------------
    def run(self) -> Path:
        try:
            with disk_errors(self.run_dir):
                logger = RunLogger(self.run_dir, enabled=self.rank0)  # first: setup's warnings go to train.log too
                try:
                    self._setup()
                    if self.rank0:
                        log.info("%s %s at epoch %d step %d (pid %d, world %d)", "resumed" if self.resuming else
                                 "started", self.run_dir, self.state["epoch"] + 1, self.state["next_step"] + 1,
                                 os.getpid(), self.ctx.dims.world_size)
                    if self.rank0 and self.state["history"]:  # a resumed run: metrics.csv as of the checkpoint
                        write_metrics_csv(self.run_dir / "metrics.csv", self.state["history"])
                    with deferred_interrupt(self.stop):  # signals are acted on at step and epoch boundaries only
                        self._epochs(logger)
                except RuntimeError as exc:  # a peer gone: its collective fails, or torchrun tears our loader down
                    lost = lost_ranks(self.peers, self.ctx.rank) if self.ctx.distributed else None
                    if lost is None or (lost.startswith("contact") and not is_comm_failure(exc)):
                        raise
                    at = getattr(self, "state", {"epoch": 0, "next_step": 0})
                    raise FullslideError(
                        f"lost {lost} during epoch {at['epoch'] + 1} step "
                        f"{at['next_step'] + 1}; the last checkpoint in {self.run_dir} is intact: rerun the "
                        f"same torchrun command with `train --resume {self.run_dir}`") from None
                finally:
                    logger.close()
        finally:
            if self.lock is not None:
                self.lock.release()
        if self.rank0:
            best = self.state.get("best")
            log.info("done: %s; best %s %s at epoch %s", self.run_dir, getattr(self, "metric_name", "-"),
                     "-" if best is None else f"{best:.4f}", self.state.get("best_epoch"))
        return self.run_dir

    def _epochs(self, logger: RunLogger) -> None:
        cfg = self.config
        for epoch in range(self.state["epoch"], cfg.train.epochs):
            self.state["epoch"] = epoch
            try:
                row = self._train_epoch(epoch)
            except StopRequested:  # state is consistent with the steps taken: save it
                where = self._save(f"e{epoch + 1:04d}_s{self.state['next_step']:06d}")
                log.warning("interrupted: checkpoint saved to %s; continue with --resume %s", where, self.run_dir)
                raise
            improved = False
            if self.val_src and ((epoch + 1) % cfg.eval.validate_every == 0 or epoch + 1 == cfg.train.epochs):
                val = evaluate_sources(self, self.val_src, n_bootstrap=0)
                row.update({f"val_{k}": v for k, v in val.items()})
                improved = self._select(row, epoch)
            self.state.update(epoch=epoch + 1, next_step=0, accum=None)
            self.state["history"].append(row)
            where = self._save(f"e{epoch + 1:04d}", pointers=("last", "best") if improved or not self.val_src else ("last",))
            if self.rank0:
                write_metrics_csv(self.run_dir / "metrics.csv", self.state["history"])
                logger.scalars({k: v for k, v in row.items() if k != "epoch"}, epoch + 1)
                logger.epoch_line(row)
            if self.stop.is_set() and epoch + 1 < cfg.train.epochs:
                log.warning("interrupted: checkpoint saved to %s; continue with --resume %s", where, self.run_dir)
                raise StopRequested(self.stop.signum)
            if cfg.train.patience and self.state["bad_epochs"] >= cfg.train.patience:
                log.info("early stopping: no improvement of %s for %d epochs", self.metric_name, cfg.train.patience)
                break

    def _select(self, row: dict[str, Any], epoch: int) -> bool:
        """Update best / patience from this epoch's validation; True when it is the new best."""
        self.metric_name, higher = selection(self.config, len(self.classes))
        value = row.get(f"val_{self.metric_name}")
        if value is None or (isinstance(value, float) and math.isnan(value)):  # e.g. AUC of one class
            self.metric_name, higher, value = "loss", False, row.get("val_loss")
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return False
        best = self.state["best"]
        loss = row.get("val_loss", math.inf)
        tie_better = value == best and loss < self.state.get("best_loss", math.inf)  # e.g. AUC saturated at 1.0
        if best is None or (value > best if higher else value < best) or tie_better:
            self.state.update(best=float(value), best_loss=float(loss), best_epoch=epoch + 1, bad_epochs=0)
            return True
        self.state["bad_epochs"] += 1
        return False


def train(config: Config | None = None, *, resume: str | Path | None = None, progress: bool = True,
          overrides: tuple[str, ...] = ()) -> Path:
    """Train (or resume) a run; returns its folder."""
    run_dir = Trainer(config, resume=resume, progress=progress, overrides=overrides).run()
    shutdown_parallel(wait=True)  # under torchrun: leave together, after rank 0 has written its files
    return run_dir


