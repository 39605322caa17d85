"""fullslide beside MONAI's ``MILModel`` trained the way MONAI's whole-slide MIL tutorial trains it (one autograd
graph over the whole bag), with the identical backbone and an attention aggregator: peak memory and step time at
each K, and the largest K each fits in a fixed memory budget, printed side by side in one run.

- ``monai``: ``MILModel(num_classes=2, mil_mode="att", backbone=<resnet18 without fc>)``, input ``[1, K, 3, H, W]``,
  cross-entropy, ``backward()``, AdamW step (the tutorial's loop, one bag per step, fp32 on CPU).
- ``fullslide-full`` / ``fullslide-recompute``: the same torchvision resnet18 (a user factory) + ABMIL, the engine
  in ``full`` (one graph, as MONAI) and ``recompute`` mode, chunk 64, the same optimizer.
BatchNorm is put in eval mode in all three (fullslide's default; MONAI's bags would otherwise normalise each bag
with its own statistics). Each (method, K) runs in a fresh process; peak = ``ru_maxrss`` growth over the step
(CPU) or ``max_memory_allocated`` (CUDA). ``monai`` is a benchmark-only dependency (``pip install monai``).

    python benchmarks/bench_peers.py                                  # CPU: 64 px, K = 64 ... 4096
    python benchmarks/bench_peers.py --device cuda --tile-px 224 --ks 64,256,1024,4096,8192 --budget-gb 20
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import run_config  # noqa: E402  (one fresh process per configuration)

METHODS = ("monai", "fullslide-full", "fullslide-recompute")


def resnet18_features(**_: object):
    """torchvision resnet18 without its classifier: tiles -> [N, 512] (the backbone both sides use)."""
    from fullslide.models._timm_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    net.feature_dim = 512
    return net


def _freeze_bn(module) -> None:
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def worker(cfg: dict) -> dict:
    """One (method, K) configuration in this process."""
    import torch
    import torch.nn.functional as F

    from fullslide.engine.memory import current_rss_bytes

    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    k, px = cfg["k"], cfg["tile_px"]
    tiles = torch.randint(0, 256, (k, 3, px, px), dtype=torch.uint8)
    y = torch.tensor([1], device=device)
    if cfg["method"] == "monai":
        from fullslide.models._timm_compat import ensure_torchvision_importable

        ensure_torchvision_importable()
        from monai.networks.nets import MILModel

        model = MILModel(num_classes=2, mil_mode="att", pretrained=False, backbone=resnet18_features(),
                         backbone_num_features=512).to(device).train()
        _freeze_bn(model.net)
        mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

        def run() -> None:
            x = ((tiles.to(device).float() / 255 - mean) / std)[None]  # [1, K, 3, H, W]: one graph over the bag
            F.cross_entropy(model(x), y).backward()
    else:
        from fullslide.engine import step
        from fullslide.models import create_model

        model = create_model("bench_peers:resnet18_features", "abmil", 2, tile_px=px).to(device).train()
        mode = cfg["method"].split("-", 1)[1]

        def run() -> None:
            step(model, [tiles], y, F.cross_entropy, mode=mode, chunk_tiles=cfg["chunk"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def one_step() -> float:
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    rss_before = current_rss_bytes()
    try:
        one_step()  # warm-up (and optimizer state)
        times = [one_step() for _ in range(cfg["steps"])]
    except torch.cuda.OutOfMemoryError:
        return {**cfg, "oom": True}
    out = {**cfg, "oom": False, "step_s": statistics.median(times)}
    if device.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before) / 2**20
    return out


def largest_k(rows: list[dict], budget_mb: float) -> str:
    """Largest K within the budget, from the two largest measured K (memory is linear in K for each method)."""
    ok = sorted((r["k"], r["peak_mb"]) for r in rows if not r.get("oom") and "peak_mb" in r)
    if len(ok) < 2:
        return "n/a"
    (k0, m0), (k1, m1) = ok[-2], ok[-1]
    slope = (m1 - m0) / (k1 - k0)
    if slope <= 0:
        return f"> {k1} (flat)"
    return f"~{int(k1 + (budget_mb - m1) / slope):,}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=lambda t: [int(v) for v in t.split(",")], default=[64, 256, 1024, 4096])
    ap.add_argument("--tile-px", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget-gb", type=float, default=8.0, help="memory budget for the largest-K column")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent)}
    rows: dict[str, list[dict]] = {m: [] for m in METHODS}
    print(f"{'K':>6} | " + " | ".join(f"{m + ' MB / s':>30}" for m in METHODS) + " | recompute vs MONAI: memory, time")
    for k in args.ks:
        cells = []
        for m in METHODS:
            cfg = {"method": m, "k": k, "tile_px": args.tile_px, "chunk": args.chunk, "steps": args.steps,
                   "device": args.device}
            r = run_config(cfg, timeout_s=3600, env=env, script=__file__)
            if r.get("error"):
                r = {**r, "oom": r.get("oom", False)}
            rows[m].append(r)
            cells.append("OOM" if r.get("oom") else (f"{r['peak_mb']:.0f} MB / {r['step_s']:.2f} s" if "step_s" in r
                                                    else str(r.get("error"))[:30]))
        mo, rc = rows["monai"][-1], rows["fullslide-recompute"][-1]
        ratio = (f"{mo['peak_mb'] / max(rc['peak_mb'], 1e-9):.1f}x less, {rc['step_s'] / mo['step_s']:.2f}x the time"
                 if "step_s" in mo and "step_s" in rc else "")
        print(f"{k:>6} | " + " | ".join(f"{c:>30}" for c in cells) + f" | {ratio}", flush=True)
    budget = args.budget_gb * 1024
    print(f"largest K in {args.budget_gb:g} GB (linear from the two largest K): "
          + ", ".join(f"{m} {largest_k(rows[m], budget)}" for m in METHODS))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
