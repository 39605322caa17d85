"""``fullslide check-grad``: prove on your own hardware that every engine configuration gives the
single-process gradient.

The parent process computes the reference (one process, one autograd graph over all tiles: ``reference.py``).
For every process count it then launches that many workers itself, the way torchrun would (env://
rendezvous on localhost; NCCL on GPUs, gloo on CPUs); the workers run every tile-parallel layout and memory
mode on the same model, tiles and seeds, and rank 0 writes the gradients of step 1 and the parameters after
``steps`` SGD (momentum 0.9) steps. The parent compares them with the reference and prints a table of max relative errors
(max |a - b| / max |b| per tensor, worst tensor) and peak memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CheckSpec:
    """Everything that defines one check (JSON-serialisable: it is handed to the workers)."""

    encoder: str = "tinycnn"
    aggregator: str = "gma"
    weights: str | None = None
    tile_px: int = 32
    tiles: list[int] = field(default_factory=lambda: [24, 17, 9, 30])  # K per slide, cycled over slides
    slides: int = 4
    n_classes: int = 2
    chunk_tiles: int = 8
    dtype: str = "float32"
    drop_rate: float = 0.1
    drop_path_rate: float = 0.1
    steps: int = 3
    lr: float = 1e-2
    seed: int = 0
    device: str = "cpu"
    modes: list[str] = field(default_factory=lambda: ["full", "checkpoint", "recompute"])
    tile_parallel: list[int] | None = None  # None: every divisor of the process count

    def k_of(self, slide: int) -> int:
        return self.tiles[slide % len(self.tiles)]

    def layouts(self, nproc: int) -> list[int]:
        options = self.tile_parallel or [d for d in range(1, nproc + 1) if nproc % d == 0]
        return [t for t in options if nproc % t == 0]


def build_model(spec: CheckSpec, device: torch.device) -> torch.nn.Module:
    """The model under test, initialised identically in every process."""
    from fullslide.models import create_model

    torch.manual_seed(spec.seed)
    model = create_model(
        spec.encoder, spec.aggregator, spec.n_classes, weights=spec.weights, tile_px=spec.tile_px,
        drop_rate=spec.drop_rate, drop_path_rate=spec.drop_path_rate,
    )
    return model.to(device).train()


def _same_kernels(device: torch.device) -> None:
    """One intra-op thread on CPU in the reference and in every worker: oneDNN picks its reduction blocking by
    thread count, and a conv-bias gradient summed over K x H x W positions then differs by ~1e-5 between 1 and
    2 threads - a kernel difference, not the engine's. (On GPU each process owns its device.)"""
    if device.type == "cpu":
        torch.set_num_threads(1)


def make_slides(spec: CheckSpec, step: int) -> list[torch.Tensor]:
    """Deterministic uint8 tiles ``[K_i, 3, P, P]`` for every slide of a step."""
    out = []
    for i in range(spec.slides):
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + step * 1009 + i)
        out.append(torch.randint(0, 256, (spec.k_of(i), 3, spec.tile_px, spec.tile_px), generator=gen, dtype=torch.uint8))
    return out


def targets_of(spec: CheckSpec) -> torch.Tensor:
    return torch.arange(spec.slides) % spec.n_classes


def _train(spec: CheckSpec, model: torch.nn.Module, run_step) -> tuple[dict, dict, float]:
    """Run ``spec.steps`` SGD steps; return (grads of step 1, final parameters, peak memory MB)."""
    from fullslide.engine.memory import PeakRSS

    device = next(model.parameters()).device
    # SGD with momentum, as in the paper's own equivalence test: params stay linear in the gradients.
    # Adam would divide rounding noise on analytically-zero gradients (an attention bias under softmax) by its
    # own tiny magnitude and turn it into lr-sized params, measuring that amplification instead of the engine.
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=1024.0) if spec.dtype == "float16" else None
    grads: dict[str, torch.Tensor] = {}
    peak = 0.0
    for s in range(spec.steps):
        slides = make_slides(spec, s)
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        with PeakRSS() as rss:
            run_step(s, slides, scaler)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device) / 2**20)
        else:
            peak = max(peak, rss.peak_growth_bytes / 2**20)
        if scaler is not None:
            scaler.unscale_(opt)
        if s == 0:
            grads = {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    params = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    return grads, params, peak


def reference(spec: CheckSpec) -> tuple[dict, dict, float]:
    """The single-process ``full`` reference, computed in this process."""
    from fullslide.engine.reference import reference_step

    device = torch.device(spec.device)
    _same_kernels(device)
    model = build_model(spec, device)

    def run(s: int, slides: list[torch.Tensor], scaler) -> None:
        loss_fn = (lambda z, y: scaler.scale(F.cross_entropy(z, y))) if scaler is not None else F.cross_entropy
        reference_step(model, slides, targets_of(spec), loss_fn, chunk_tiles=spec.chunk_tiles, step_seed=s,
                       amp_dtype=DTYPES[spec.dtype])

    return _train(spec, model, run)


def worker_main(spec_path: str, out_dir: str) -> None:
    """One rank of a launch: every (layout, mode) of the spec, results written by rank 0."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from fullslide.engine import Bag, init_parallel, rank_tile_range, slides_for_group, step

    spec = CheckSpec(**json.loads(Path(spec_path).read_text()))
    _same_kernels(torch.device(spec.device))
    world = int(os.environ["WORLD_SIZE"])
    for tp in spec.layouts(world):
        ctx = init_parallel(tile_parallel=tp)
        for mode in spec.modes:
            model = build_model(spec, ctx.device)
            mine = slides_for_group(spec.slides, ctx.dims.slide_groups, ctx.slide_group)

            def run(s: int, slides: list[torch.Tensor], scaler, mode=mode, model=model, mine=mine, ctx=ctx) -> None:
                bags = []
                for i in mine:
                    start, stop = rank_tile_range(len(slides[i]), spec.chunk_tiles, ctx.tp_rank, ctx.tp_size)
                    bags.append(Bag(index=i, tiles=slides[i][start:stop], k_total=len(slides[i])))
                step(model, bags, targets_of(spec), F.cross_entropy, mode=mode, chunk_tiles=spec.chunk_tiles,
                     step_seed=s, amp_dtype=DTYPES[spec.dtype], grad_scaler=scaler, parallel=ctx)

            grads, params, peak = _train(spec, model, run)
            peaks = torch.tensor([peak], dtype=torch.float64)
            if ctx.distributed:
                dist.all_reduce(peaks, op=dist.ReduceOp.MAX)  # COLLECTIVE (world): report the worst rank
            if ctx.rank == 0:
                tag = f"n{world}_t{tp}_{mode}"
                save_file(grads, str(Path(out_dir) / f"{tag}_grads.safetensors"))
                save_file(params, str(Path(out_dir) / f"{tag}_params.safetensors"))
                (Path(out_dir) / f"{tag}.json").write_text(json.dumps({"peak_mb": float(peaks[0])}))
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(spec: CheckSpec, nproc: int, out_dir: Path, timeout_s: float = 900.0) -> None:
    """Start ``nproc`` workers with torchrun's environment and wait; raise with the failing rank's stderr."""
    spec_path = out_dir / f"spec_{nproc}.json"
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc), RANK=str(rank),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "fullslide.engine.checkgrad", str(spec_path), str(out_dir)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout_s
    failures = []
    for rank, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            for q in procs:
                q.kill()
            raise RuntimeError(f"--nproc {nproc}: workers did not finish within {timeout_s:.0f} s") from exc
        if p.returncode != 0:
            failures.append(f"rank {rank} exited {p.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    if failures:
        raise RuntimeError(f"--nproc {nproc}: " + "; ".join(failures))


def max_rel_error(ours: dict, ref: dict, prefix: str) -> float:
    """``max |a - b|`` over the tensors named ``prefix*``, divided by the largest ``|b|`` among them.

    Normalising by the group's largest reference value (not tensor by tensor) keeps the measure meaningful
    for tensors whose gradient is analytically near zero (an attention bias under softmax, a head bias whose
    terms cancel), where any rounding would look like a 100% error.
    """
    diff, scale = 0.0, 0.0
    for name, r in ref.items():
        if not name.startswith(prefix):
            continue
        if name not in ours:
            return float("inf")
        diff = max(diff, float((ours[name] - r).abs().max()))
        scale = max(scale, float(r.abs().max()))
    return diff / scale if scale > 0 else diff


@dataclass
class CheckRow:
    """One line of the check-grad table."""

    nproc: int
    tile_parallel: int
    mode: str
    encoder_grad: float
    aggregator_grad: float
    params: float
    peak_mb: float
    ok: bool
    error: str = ""

    @property
    def slide_groups(self) -> int:
        return self.nproc // self.tile_parallel


def run_checks(spec: CheckSpec, nprocs: list[int], tol: float, progress=print) -> tuple[list[CheckRow], float]:
    """Reference + every launch; returns the rows and the reference's peak memory (MB)."""
    ref_grads, ref_params, ref_peak = reference(spec)
    rows: list[CheckRow] = []
    with tempfile.TemporaryDirectory(prefix="fullslide-checkgrad-") as tmp:
        for nproc in nprocs:
            progress(f"check-grad: launching {nproc} process(es) for layouts {spec.layouts(nproc)} x modes {spec.modes}")
            try:
                launch(spec, nproc, Path(tmp))
            except RuntimeError as exc:
                rows += [CheckRow(nproc, tp, m, float("inf"), float("inf"), float("inf"), 0.0, False, str(exc))
                         for tp in spec.layouts(nproc) for m in spec.modes]
                continue
            from safetensors.torch import load_file

            for tp in spec.layouts(nproc):
                for mode in spec.modes:
                    tag = Path(tmp) / f"n{nproc}_t{tp}_{mode}"
                    grads, params = load_file(f"{tag}_grads.safetensors"), load_file(f"{tag}_params.safetensors")
                    errs = (max_rel_error(grads, ref_grads, "encoder."), max_rel_error(grads, ref_grads, "aggregator."),
                            max_rel_error(params, ref_params, ""))
                    peak = json.loads(Path(f"{tag}.json").read_text())["peak_mb"]
                    rows.append(CheckRow(nproc, tp, mode, *errs, peak, ok=max(errs) <= tol))
    return rows, ref_peak


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])
