"""Does the data path keep the engine fed? Two claims, each beside its baseline in the same run.

1. Loader cost per core: fullslide's loader item (``StepDataset``: open, read, decode, to CHW tensors - what a
   loader worker does; augmentation runs on the encoder's device) beside raw ``OpenSlide.read_region`` on the
   same tiles, one process. Goal: >= 0.85x raw throughput.
2. Training throughput: ``fullslide train`` (loader workers reading ahead) beside the engine alone on the same
   tiles already in memory (device augmentation + ``engine.step`` + AdamW, same model, K, chunk). Goal: >= 0.9x
   once ``loader_workers >= 1``. Steady epochs only (the first pays start-up).
3. (``--only memory``) Host memory of the loader against K with the default budget (``train.prefetch_tiles``:
   one step's tiles in flight): peak growth in steps of tiles, goal about 2 at any K.

    python benchmarks/bench_loader.py                          # tinycnn, 64 px at 1 mpp, K=256, 24 slides
    python benchmarks/bench_loader.py --workers 2 --k 512 --json out.json
    python benchmarks/bench_loader.py --only memory --tile-px 224 --mpp 0.5 --workers 2   # 3. peak memory vs K

Run it alone on a quiet machine (``uptime`` before and after).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_data(work: Path, slides: int, size: int, tile_px: int, mpp: float) -> tuple[Path, Path]:
    """A synthetic cohort with a split column (all train but 2 val) and its coords, made once and cached."""
    from fullslide.slides import tile_slides
    from fullslide.slides.synth import make_cohort

    labels = work / "synth" / "labels.csv"
    if not labels.exists():
        make_cohort(work / "synth", slides, signal="focal", size=(size, size), mpp=0.5, lesion_fraction=0.05, seed=1)
    cohort = work / "cohort.csv"
    rows = list(csv.DictReader(open(labels, newline="")))
    with open(cohort, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "label", "patient_id", "split"])
        for i, r in enumerate(rows):
            w.writerow([r["slide_id"], str(labels.parent / r["path"]), r["label"], r["patient_id"],
                        "val" if i >= len(rows) - 2 else "train"])
    tiles = work / f"tiles_{tile_px}_{mpp}"
    tile_slides([cohort], tiles, target_mpp=mpp, tile_px=tile_px, workers=2)
    return cohort, tiles


def config(work: Path, cohort: Path, tiles: Path, args: argparse.Namespace, run: str):
    from fullslide.train.config import config_from_dict

    return config_from_dict({
        "run_dir": str(work / run),
        "data": {"cohort": str(cohort), "coords_dir": str(tiles), "tile_px": args.tile_px, "target_mpp": args.mpp,
                 "split_method": "column"},
        "encoder": {"name": "tinycnn", "lr": 1e-4},
        "aggregator": {"name": "gma", "lr": 1e-4},
        "train": {"epochs": args.epochs, "tiles_per_slide": args.k, "slides_per_step": 1, "chunk_tiles": args.chunk,
                  "loader_workers": args.workers, "device": args.device,
                  "precision": "fp32" if args.device == "cpu" else "bf16"},
        "eval": {"validate_every": 1000},
    })


def loader_vs_raw(cfg, args: argparse.Namespace) -> dict:
    """Claim 1: the same tiles through raw OpenSlide and through a loader item, one core, interleaved repeats."""
    import openslide
    import torch

    from fullslide.data.loader import StepDataset, assemble_steps
    from fullslide.data.sampler import TileSampler
    from fullslide.engine import ParallelDims
    from fullslide.slides import read_coords
    from fullslide.train.setup import prepare_data
    from fullslide.engine import ParallelContext

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: what one loader worker has
    data = prepare_data(cfg, Path(cfg.run_dir), ParallelContext.single())
    src = data.split_sources("train")
    plans = TileSampler([s.n_tiles for s in src], k=args.k, slides_per_step=1, seed=0).epoch(0)
    geo = {s.slide_id: read_coords(s.coords_h5) for s in src}
    n_tiles = sum(len(t) for p in plans for t in p.tiles)
    raw_times, ours_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()  # raw: what a minimal reader does, no conversion
        for p in plans:
            s = src[p.slides[0]]
            coords, g = geo[s.slide_id]
            slide = openslide.OpenSlide(s.path)
            for x, y in coords[p.tiles[0]].tolist():
                slide.read_region((x, y), g.level, (g.read_px, g.read_px))
            slide.close()
        raw_times.append(time.perf_counter() - start)
        dataset = StepDataset(plans, src, dims=ParallelDims(world_size=1, tile_parallel=1), rank=0,
                              chunk_tiles=args.chunk)
        start = time.perf_counter()
        for _ in assemble_steps((dataset[i] for i in range(len(dataset))), dataset):
            pass
        ours_times.append(time.perf_counter() - start)
        dataset.reader.close()
    torch.set_num_threads(threads)
    raw, ours = float(np.median(raw_times)), float(np.median(ours_times))
    return {"tiles": n_tiles, "raw_tiles_per_s": n_tiles / raw, "loader_tiles_per_s": n_tiles / ours,
            "ratio": raw / ours}


def train_vs_engine(cfg, args: argparse.Namespace) -> dict:
    """Claim 2: steady-epoch tiles/s of `fullslide train` and of the engine alone on the same tiles in memory."""
    import torch

    from fullslide.data.augment import Augment, augment_batch
    from fullslide.data.loader import StepDataset, assemble_steps
    from fullslide.engine import Bag, ParallelContext, ParallelDims, step
    from fullslide.data.sampler import TileSampler, step_seed
    from fullslide.train.losses import make_loss
    from fullslide.train.setup import build_model, prepare_data
    from fullslide.train.trainer import make_optimizer, train

    run = train(cfg, progress=False)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    steady = rows[1:] or rows
    train_tps = float(np.mean([float(r["tiles_per_s"]) for r in steady]))

    data = prepare_data(cfg, Path(cfg.run_dir), ParallelContext.single())
    src = data.split_sources("train")
    plans = TileSampler([s.n_tiles for s in src], k=args.k, slides_per_step=1, seed=cfg.train.seed).epoch(1)
    dataset = StepDataset(plans, src, dims=ParallelDims(world_size=1, tile_parallel=1), rank=0, chunk_tiles=args.chunk)
    items = list(assemble_steps((dataset[i] for i in range(len(dataset))), dataset))  # the epoch's tiles, in memory
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    model = build_model(cfg, 2).to(device)
    opt = make_optimizer(cfg, model)
    loss_fn = make_loss("classification", n_classes=2)
    aug = Augment(flip=cfg.augment.flip, rot90=cfg.augment.rot90, blur_p=cfg.augment.blur_p, jitter=cfg.augment.jitter)
    model.train()
    targets = torch.tensor([0])
    amp = torch.bfloat16 if device.type == "cuda" else None
    times = []
    for _ in range(2):  # the second pass is the steady one
        start = time.perf_counter()
        for plan, item in zip(plans, items):
            tiles = augment_batch(item.data[0].to(device), aug, seed=0, epoch=1, slide=plan.slides[0],
                                  positions=np.arange(len(plan.tiles[0])))
            step(model, [Bag(index=0, tiles=tiles)], targets, loss_fn, mode=cfg.train.mode,
                 chunk_tiles=args.chunk, step_seed=step_seed(0, 1, plan.step), amp_dtype=amp)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    n_tiles = sum(len(p.tiles[0]) for p in plans)
    engine_tps = n_tiles / times[-1]
    return {"train_tiles_per_s": train_tps, "engine_tiles_per_s": engine_tps, "ratio": train_tps / engine_tps,
            "epochs_measured": len(steady)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fullslide_bench_loader")
    ap.add_argument("--slides", type=int, default=26, help="synthetic slides (2 of them validation)")
    ap.add_argument("--size", type=int, default=2048, help="slide side in pixels at 0.5 mpp")
    ap.add_argument("--tile-px", type=int, default=64)
    ap.add_argument("--mpp", type=float, default=1.0)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the engine runs (cuda: bf16)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=("loader", "train", "memory"), default=None)
    ap.add_argument("--memory-ks", type=lambda t: [int(v) for v in t.split(",")], default=[2048, 8192, 20000])
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--memory-hold-s", type=float, default=2.0, help="seconds the consumer spends on each step")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cohort, tiles = make_data(args.work, args.slides, args.size, args.tile_px, args.mpp)
    out = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": sys.version.split()[0], **vars(args)}
    out["work"] = str(args.work)
    if args.only in (None, "loader"):
        r = loader_vs_raw(config(args.work, cohort, tiles, args, "run_loader"), args)
        out["loader"] = r
        print(f"loader, 1 core, {r['tiles']} tiles of {args.tile_px} px: raw OpenSlide.read_region "
              f"{r['raw_tiles_per_s']:.0f} tiles/s | fullslide loader item {r['loader_tiles_per_s']:.0f} tiles/s | "
              f"{r['ratio']:.2f}x raw (goal >= 0.85x)")
    if args.only in (None, "train"):
        import shutil

        shutil.rmtree(args.work / "run_train", ignore_errors=True)
        r = train_vs_engine(config(args.work, cohort, tiles, args, "run_train"), args)
        out["train"] = r
        print(f"training, {args.workers} loader worker(s), K={args.k}: engine alone {r['engine_tiles_per_s']:.0f} "
              f"tiles/s | fullslide train {r['train_tiles_per_s']:.0f} tiles/s | {r['ratio']:.2f}x the engine "
              f"(goal >= 0.9x)")
    if args.only == "memory":  # opt-in: reads K x steps tiles (K = 20,000 at 224 px: ~1 min per step per worker)
        out["memory"] = memory_against_k(config(args.work, cohort, tiles, args, "run_memory"), args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))



def memory_against_k(cfg, args: argparse.Namespace) -> list[dict]:
    """Claim 3: peak memory (this process's RSS + the loader workers' unique memory) of the loader alone against K,
    with the default budget, while a slow consumer holds each step."""
    import threading

    import psutil

    from fullslide.data.loader import (StepDataset, assemble_steps, default_prefetch_tiles, make_loader,
                                       prefetch_per_worker)
    from fullslide.data.sampler import TileSampler
    from fullslide.engine import ParallelContext, ParallelDims
    from fullslide.train.setup import prepare_data

    data = prepare_data(cfg, Path(cfg.run_dir), ParallelContext.single())
    src = data.split_sources("train")
    rows = []
    for k in args.memory_ks:
        plans = TileSampler([s.n_tiles for s in src], k=k, slides_per_step=1, seed=0).epoch(0)[: args.memory_steps]
        ds = StepDataset(plans, src, dims=ParallelDims(world_size=1, tile_parallel=1), rank=0, chunk_tiles=args.chunk,
                         part_tiles=1024)
        budget = default_prefetch_tiles(3 * args.tile_px**2, ds.step_tiles)
        loader = make_loader(ds, workers=args.workers, prefetch=prefetch_per_worker(budget, 1024, args.workers))
        me = psutil.Process()
        start = me.memory_info().rss
        peak, stop = [0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                total = me.memory_info().rss
                for child in me.children(recursive=True):
                    try:  # unique pages only: a forked worker shares the parent's, which RSS would count again
                        total += child.memory_full_info().uss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total)
                time.sleep(0.01)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        for step in assemble_steps(loader, ds):
            time.sleep(args.memory_hold_s)  # a slow consumer (the GPU step): the loader fills its budget
            del step
        stop.set()
        thread.join()
        step_mb = ds.step_tiles * 3 * args.tile_px**2 / 2**20
        rows.append({"k": k, "step_mb": step_mb, "peak_growth_mb": (peak[0] - start) / 2**20,
                     "in_steps": (peak[0] - start) / 2**20 / step_mb})
        print(f"memory, K={k} ({step_mb:.0f} MB a step at {args.tile_px} px), {args.workers} worker(s): peak growth "
              f"{rows[-1]['peak_growth_mb']:.0f} MB = {rows[-1]['in_steps']:.2f} steps (goal: about 2)")
    return rows


if __name__ == "__main__":
    main()
