"""Whole-slide context at the cost of K: step time and memory of ``train.context: cache`` against K = all.

For one slide of N tiles, three ways to train a step, in the same process on the same tiles:

- ``cache K``: the engine encodes K sampled tiles (graph kept or recomputed by ``mode``), the aggregator reads all
  N rows (the N - K others from the cache), then the K fresh rows are written back - timed *with* the cache's
  read and atomic write of the slide's ``[N, D]`` float16 file (``fullslide.train.context``);
- ``none K``: the same K tiles without context (today's default);
- ``all``: K = N, every tile encoded (``recompute``: the only mode whose memory does not grow with N).

Claim (issue "Whole-slide context"): at N = 10,000 and K = 256, ``cache`` costs under 1/10 of ``all`` and within
1.1x of ``none``. Memory: the autograd-held peak (saved-tensor hooks; CUDA: ``max_memory_allocated``).

    python benchmarks/bench_context.py                       # CPU: tinycnn 32 px, N 1k/10k/50k, K 64/256
    python benchmarks/bench_context.py --device cuda --encoder vit_small_patch16_224 --tile-px 224
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--encoder", default="tinycnn")
    ap.add_argument("--tile-px", type=int, default=32)
    ap.add_argument("--ns", default="1000,10000,50000")
    ap.add_argument("--ks", default="64,256")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--mode", default="recompute", help="engine mode of the K-tile steps (all always recomputes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from fullslide.engine import Bag, step
    from fullslide.engine.memory import SavedTensorMeter
    from fullslide.models import create_model
    from fullslide.train.context import ContextCache, context_rows, replace_rows

    device = torch.device(args.device)
    amp = torch.bfloat16 if args.dtype == "bfloat16" else None
    torch.manual_seed(0)
    model = create_model(args.encoder, "gma", 2, tile_px=args.tile_px).to(device).train()
    y = torch.tensor([1])
    px = args.tile_px

    def timed(fn) -> tuple[float, float]:
        """(median seconds, peak MB held for backward) over the repeats, after one warm-up."""
        times, peak = [], 0.0
        for i in range(args.repeats + 1):
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            meter = SavedTensorMeter()
            t0 = time.perf_counter()
            with meter:
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
            mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else meter.peak_bytes
            peak = max(peak, mem / 2**20)
        return statistics.median(times), peak

    print(f"# bench_context: {args.encoder} + gma, {px} px, chunk {args.chunk}, K steps in mode {args.mode}, "
          f"{args.dtype}, {device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, torch "
          f"{torch.__version__}")
    print(f"{'N':>7} {'K':>5} | {'cache s':>8} {'none s':>8} {'all s':>8} | {'cache/all':>9} {'cache/none':>10} | "
          f"{'cache MB':>9} {'none MB':>8} {'all MB':>8}")
    rng = np.random.default_rng(0)
    for n in [int(v) for v in args.ns.split(",")]:
        tiles = torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            cache = ContextCache(Path(tmp))
            cache.write("slide", 1, torch.randn(n, model.feature_dim))  # the extraction before step 0
            t_all, m_all = timed(lambda: step(model, [Bag(index=0, tiles=tiles)], y, F.cross_entropy, mode="recompute",
                                              chunk_tiles=args.chunk, amp_dtype=amp, step_seed=0))
            counter = iter(range(10**6))  # global step index: each step reads what the previous one wrote
            for k in [int(v) for v in args.ks.split(",")]:
                sampled = np.sort(rng.choice(n, size=k, replace=False))
                part = tiles[torch.as_tensor(sampled)]

                def with_cache() -> None:
                    g = next(counter)
                    rows = cache.read("slide", g)  # [N, D]
                    result = step(model, [Bag(index=0, tiles=part,
                                              context=context_rows(rows, sampled).to(device, non_blocking=True))], y,
                                  F.cross_entropy, mode=args.mode, chunk_tiles=args.chunk, amp_dtype=amp, step_seed=0)
                    cache.write_step("slide", g, replace_rows(rows, sampled, result.fresh_features[0].cpu(), in_place=True))
                    cache.prune(g + 1)

                t_cache, m_cache = timed(with_cache)
                t_none, m_none = timed(lambda: step(model, [Bag(index=0, tiles=part)], y, F.cross_entropy, mode=args.mode,
                                                    chunk_tiles=args.chunk, amp_dtype=amp, step_seed=0))
                print(f"{n:>7} {k:>5} | {t_cache:8.3f} {t_none:8.3f} {t_all:8.3f} | {t_cache / t_all:9.3f} "
                      f"{t_cache / t_none:10.2f} | {m_cache:9.1f} {m_none:8.1f} {m_all:8.1f}", flush=True)
    print("goal at N=10,000, K=256: cache/all < 0.10 and cache/none <= 1.10")


if __name__ == "__main__":
    main()
