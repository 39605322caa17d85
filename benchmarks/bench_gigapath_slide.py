"""Prov-GigaPath's slide encoder (``gigapath-slide``): peak memory and time of one forward + backward over a slide
of L tiles, with its layers checkpointed (fullslide's default) against keeping every layer's graph.

Each configuration runs in a fresh process (peak RSS is per process): the 12-layer 768-d LongNet with the card's
segment lengths and dilations on L random 1536-d tile features at distinct grid places; the figure is the peak
resident memory above the process's footprint after building the model and the inputs (CUDA:
``max_memory_allocated``), and the wall time of the step (median of ``--repeats``).

Claim (README, "Slide encoders"): checkpointed layers hold one layer's attention at a time, so the memory of a
step grows several times more slowly with L than with every layer's graph kept (2-core CPU: ~0.9 GB against ~5 GB
per 1,000 tiles between L = 1,000 and 2,000), for ~1.3-1.5x the time.

    python benchmarks/bench_gigapath_slide.py                 # CPU: L = 500, 1000, 2000
    python benchmarks/bench_gigapath_slide.py --device cuda --ls 2000,10000
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def one(length: int, checkpoint: bool, device: str, repeats: int) -> dict:
    import torch

    from fullslide.models.slide_encoders import GigaPathSlideEncoder

    torch.manual_seed(0)
    model = GigaPathSlideEncoder(1536, 2, checkpoint_layers=checkpoint).to(device).train()
    side = int(length ** 0.5) + 2
    cells = torch.randperm(side * side)[:length]
    positions = torch.stack([cells // side, cells % side], 1).float().to(device)
    feats = torch.randn(length, 1536, device=device, requires_grad=True)
    times = []
    base = _peak_rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(feats, positions)
        out.logits.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        feats.grad = None
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()) - base
    return {"L": length, "checkpoint": checkpoint, "peak_mb": peak / 2**20, "seconds": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ls", default="500,1000,2000")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        length, checkpoint = args.one.split(":")
        print(json.dumps(one(int(length), checkpoint == "1", args.device, args.repeats)))
        return
    print(f"{'L tiles':>8} {'layers kept: MB':>16} {'s':>7} {'checkpointed: MB':>17} {'s':>7} {'memory ratio':>13}")
    for length in (int(v) for v in args.ls.split(",")):
        rows = {}
        for checkpoint in (False, True):
            cmd = [sys.executable, __file__, "--one", f"{length}:{int(checkpoint)}", "--device", args.device,
                   "--repeats", str(args.repeats)]
            rows[checkpoint] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        kept, ckpt = rows[False], rows[True]
        print(f"{length:>8} {kept['peak_mb']:>16.0f} {kept['seconds']:>7.2f} {ckpt['peak_mb']:>17.0f} "
              f"{ckpt['seconds']:>7.2f} {kept['peak_mb'] / max(ckpt['peak_mb'], 1e-9):>12.1f}x", flush=True)


if __name__ == "__main__":
    main()
