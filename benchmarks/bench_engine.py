"""Peak memory and step time against K for the engine's memory modes, each run in its own process.

``auto`` (the default mode) runs under ``--budget`` (what one step may add): it should match ``full``'s time
(goal: within 1.05x) wherever ``full`` fits the budget, stay within the budget (+10%) at every K, and never be
slower than ``recompute``.

Claim under test: ``recompute`` memory does not grow with K (beyond the K x D features, the aggregator's
per-tile activations and the tiles themselves) and costs at most ~4/3 of ``full``'s time (one extra encoder
forward); ``full`` - what the paper does - grows linearly with K. Every configuration runs in a fresh process,
so its peak memory is its own: on CPU the process's peak RSS (``ru_maxrss``) minus its RSS just before the
first step (the tiles are already allocated then), measured in a second run with ``MALLOC_MMAP_THRESHOLD_``
so that RSS follows live tensors; on CUDA ``max_memory_allocated``. CPU times come from a run in which glibc
keeps freed memory (see ``keep_heap``). Each time is the median of at least ``--steps`` steps and
``--min-time`` seconds, after one warm-up step. We also report the
encoder activations held for backward (exact, via autograd's saved-tensor hooks), which isolates the encoder.

    python benchmarks/bench_engine.py                                   # CPU: tinycnn, 64 px, K 64..8192, 1 GB
    python benchmarks/bench_engine.py --encoder vit_base_patch16_224 --tile-size 224 --dtype bfloat16 \
        --ks 64,256,1024,4096 --find-max-k                              # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = ("full", "checkpoint", "recompute", "auto")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 peak, vendor datasheets


def worker(cfg: dict) -> dict:
    """Run one (K, mode) configuration in this process and return its measurements."""
    import torch
    import torch.nn.functional as F

    from fullslide.engine import step
    from fullslide.engine.memory import SavedTensorMeter, current_rss_bytes
    from fullslide.models import create_model

    device = torch.device(cfg["device"])
    amp = {"float32": None, "bfloat16": torch.bfloat16}[cfg["dtype"]]
    torch.manual_seed(0)
    model = create_model(cfg["encoder"], cfg["aggregator"], 2, tile_px=cfg["tile_px"]).to(device).train()
    k, px = cfg["k"], cfg["tile_px"]
    tiles = torch.randint(0, 256, (k, 3, px, px), dtype=torch.uint8)
    if device.type == "cuda":
        tiles = tiles.pin_memory()
    y = torch.tensor([1])
    meter = SavedTensorMeter()
    inner = model.encoder.backbone

    class Metered(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with meter:
                return self.inner(x)

    def one_step() -> float:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = step(model, [tiles], y, F.cross_entropy, mode=cfg["mode"], chunk_tiles=cfg["chunk"], amp_dtype=amp,
                      memory_budget=cfg.get("budget"))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if result.plan is not None:
            plans.append(result.plan)
        return time.perf_counter() - t0

    plans: list = []

    rss_before = current_rss_bytes()
    times: list[float] = []
    try:
        one_step()  # warm-up
        while len(times) < cfg["steps"] or sum(times) < cfg["min_time"]:  # timed: at least `steps` and `min_time`
            times.append(one_step())
        if cfg["mode"] != "checkpoint":
            # one more, untimed step with the encoder metered (hooks cost Python time). Not in checkpoint mode: hooks
            # inside a checkpointed region would take precedence over checkpoint's own and keep activations alive.
            model.encoder.backbone = Metered()
            one_step()
    except torch.cuda.OutOfMemoryError:
        return {**cfg, "oom": True}
    out = {**cfg, "oom": False, "step_s": statistics.median(times), "timed_steps": len(times),
           "encoder_saved_mb": meter.peak_bytes / 2**20}
    if plans:
        out.update(kept_chunks=plans[0].kept_chunks, recomputed_chunks=plans[0].recomputed_chunks,
                   predicted_mb=plans[0].predicted_peak_bytes / 2**20)
    if device.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        flops = _flops_per_tile(model.encoder, px, device, amp)
        out["mfu"] = 3 * flops * k / out["step_s"] / (_peak_tflops() * 1e12)
    else:
        out["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before) / 2**20
    return out


def _flops_per_tile(encoder, px: int, device, amp) -> float:
    """Forward FLOPs of one tile (torch's FLOP counter); training counts 3x (forward + backward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, px, px, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.autocast(device.type, amp or torch.float32,
                                                                                      enabled=amp is not None):
        encoder(x)
    return float(counter.get_total_flops())


def _peak_tflops() -> float:
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))


def run_config(cfg: dict, timeout_s: float, env: dict | None = None, script: str = __file__) -> dict:
    """One configuration in a fresh process (``script --worker CFG``); a killed process (host OOM) is reported."""
    cmd = [sys.executable, script, "--worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env=None if env is None else {**os.environ, **env})
    except subprocess.TimeoutExpired:
        return {**cfg, "oom": False, "error": f"timeout {timeout_s:.0f}s"}
    if proc.returncode != 0:
        return {**cfg, "oom": proc.returncode in (-9, 137), "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="tinycnn")
    p.add_argument("--aggregator", default="gma")
    p.add_argument("--tile-size", type=int, default=64)
    p.add_argument("--ks", default="64,256,1024,4096,8192")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration at least (after 1 warm-up)")
    p.add_argument("--min-time", type=float, default=3.0, help="keep timing steps until this many seconds (median)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--budget", default="1GB", help="memory budget of mode auto (bytes, '1GB', or a fraction)")
    p.add_argument("--device", default="auto")
    p.add_argument("--full-mem-limit-gb", type=float, default=12.0,
                   help="skip full/checkpoint where their extrapolated memory exceeds this (CPU host safety)")
    p.add_argument("--find-max-k", action="store_true", help="GPU: double K per mode until out of memory")
    p.add_argument("--max-k-cap", type=int, default=65536,
                   help="--find-max-k stops doubling here (the tiles of one step live in host memory)")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    ks = [int(k) for k in args.ks.split(",")]
    modes = args.modes.split(",")
    base = dict(encoder=args.encoder, aggregator=args.aggregator, tile_px=args.tile_size, chunk=args.chunk,
                steps=args.steps, min_time=args.min_time, dtype=args.dtype, device=device, budget=args.budget)
    print(f"# bench_engine: {args.encoder} + {args.aggregator}, {args.tile_size} px, chunk {args.chunk}, {args.dtype}, "
          f"{device}{' ' + torch.cuda.get_device_name() if device == 'cuda' else ''}, torch {torch.__version__}, "
          f"auto budget {args.budget}")
    results: dict[tuple[int, str], dict] = {}
    for mode in modes:
        per_tile_mb = None
        for k in ks:
            if mode != "auto" and per_tile_mb is not None and device == "cpu" and per_tile_mb * k / 1024 > args.full_mem_limit_gb:
                results[(k, mode)] = {**base, "k": k, "mode": mode, "skipped": True}
                continue
            # CPU timing: glibc keeps freed memory (no trim, no per-tensor mmap). Otherwise it returns each chunk's
            # freed activations to the OS and page-faults them back for the next chunk - an allocator artefact that
            # penalises chunked modes and that PyTorch's CUDA caching allocator does not have.
            keep_heap = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
            r = run_config({**base, "k": k, "mode": mode}, args.timeout, env=keep_heap if device == "cpu" else None)
            if device == "cpu" and "peak_mb" in r:
                # Memory from a second run in which glibc serves every allocation >= 64 KiB by mmap and returns it
                # on free, so RSS follows live tensors instead of heap left fragmented by earlier chunks. Timing
                # comes from the first run (default allocator): mmap-per-tensor is slow.
                mem = run_config({**base, "k": k, "mode": mode, "steps": 1, "min_time": 0.0}, args.timeout,
                                 env={"MALLOC_MMAP_THRESHOLD_": "65536"})
                r["peak_mb"] = mem.get("peak_mb", float("nan"))
            results[(k, mode)] = r
            if mode in ("full", "checkpoint") and "peak_mb" in r:
                per_tile_mb = r["peak_mb"] / k
            print(f"  done K={k:<6} {mode:<10} {r.get('step_s', float('nan')):8.2f} s  {r.get('peak_mb', float('nan')):9.1f} MB",
                  file=sys.stderr, flush=True)
    mem_label = "peak_cuda_MB" if device == "cuda" else "step_peak_MB"
    print(f"\n{'K':>6} | " + " | ".join(f"{m:^36}" for m in modes))
    print(f"{'':>6} | " + " | ".join(f"{'step_s':>8} {'tiles/s':>8} {mem_label:>12} {'enc_MB':>6}" for _ in modes))
    for k in ks:
        cells = []
        for m in modes:
            r = results[(k, m)]
            if r.get("skipped") or r.get("oom") or "error" in r:
                why = "skipped (mem)" if r.get("skipped") else ("OOM" if r.get("oom") else "error")
                cells.append(f"{why:>36}")
            else:
                enc = f"{r['encoder_saved_mb']:6.1f}" if m != "checkpoint" else f"{'-':>6}"
                cells.append(f"{r['step_s']:8.2f} {k / r['step_s']:8.0f} {r['peak_mb']:12.1f} {enc}")
        print(f"{k:>6} | " + " | ".join(cells))
    ok = {key: r for key, r in results.items() if "step_s" in r}
    if (ks[-1], "recompute") in ok and (256, "recompute") in ok:
        ratio = ok[(ks[-1], "recompute")]["peak_mb"] / ok[(256, "recompute")]["peak_mb"]
        print(f"\nrecompute peak memory K={ks[-1]} / K=256: {ratio:.2f}x (goal <= 1.2x)")
    for k in ks:
        if (k, "full") in ok and (k, "recompute") in ok:
            print(f"recompute / full step time at K={k}: {ok[(k, 'recompute')]['step_s'] / ok[(k, 'full')]['step_s']:.2f}x"
                  " (goal <= 1.4x; floor 4/3)")
    if "auto" in modes:
        from fullslide.engine.budget import parse_bytes, resolve_budget

        budget_mb = resolve_budget(parse_bytes(args.budget), torch.device(device)) / 2**20
        print(f"\nauto under a {budget_mb:,.0f} MB budget:")
        for k in ks:
            a = ok.get((k, "auto"))
            if a is None:
                continue
            line = (f"  K={k:<6} kept {a.get('kept_chunks', 0)}/{a.get('kept_chunks', 0) + a.get('recomputed_chunks', 0)}"
                    f" chunks, peak {a['peak_mb']:,.0f} MB = {a['peak_mb'] / budget_mb:.2f}x budget (goal <= 1.10)")
            f, rc = ok.get((k, "full")), ok.get((k, "recompute"))
            if f is not None and f["peak_mb"] <= budget_mb:
                line += f"; auto/full time {a['step_s'] / f['step_s']:.2f}x (goal <= 1.05)"
            if rc is not None:
                line += f"; auto/recompute time {a['step_s'] / rc['step_s']:.2f}x (goal <= 1.0)"
            print(line)
    if device == "cuda":
        for k in ks:
            if (k, "recompute") in ok:
                print(f"MFU recompute K={k}: {ok[(k, 'recompute')]['mfu'] * 100:.1f}% (model FLOPs = 3 x forward)")
        if args.find_max_k:
            for m in modes:
                k = ks[-1]
                while k * 2 <= args.max_k_cap:
                    r = run_config({**base, "k": k * 2, "mode": m, "steps": 1, "min_time": 0.0}, args.timeout)
                    if r.get("oom") or "error" in r:
                        break
                    k *= 2
                why = "next doubling failed" if k * 2 <= args.max_k_cap else f"cap --max-k-cap {args.max_k_cap} reached"
                print(f"largest K that fits ({m}): {k} ({why})", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r for r in results.values()], fh, indent=1)


if __name__ == "__main__":
    main()
