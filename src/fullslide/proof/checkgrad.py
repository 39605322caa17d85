"""``fullslide check-grad``: prove on your own hardware that every engine configuration gives the gradient of
one process and one autograd graph.

The parent process computes the reference (:mod:`fullslide.proof.reference`, which shares no code with the
engine). For every process count it then launches that many workers itself, the way torchrun would (env://
rendezvous on localhost; NCCL on GPUs, gloo on CPUs); the workers run every tile-parallel layout and memory
mode on the same model, tiles and seeds, and *every* rank writes what it ends with. What is compared:

- the gradient after step 1, which accumulates ``micro_batches`` engine calls without zeroing in between (so
  a step that drops or re-reduces a pre-existing ``.grad`` shows);
- which parameters have a gradient at all (an unused parameter must keep ``.grad = None``);
- the parameter *updates* (after minus before) over ``steps`` SGD steps (momentum 0.9, weight decay).

The model carries the probes of :mod:`fullslide.proof.probes` (tied, frozen and unused parameters, drop-path)
and attention pooling streams over chunks of ``aggregator_chunk_tiles`` tiles, smaller than a slide, so the
online softmax must rescale when a later chunk holds the highest score (the reference reports how often).

Error of a tensor: ``max |a - b| / max(max |b|, ZERO_FLOOR * G)``, where ``G`` is the largest ``|b|`` of its
group (encoder gradients, aggregator gradients, updates). The floor only matters for tensors whose reference
is (analytically) zero to within ``ZERO_FLOOR`` of the group, like an attention bias under softmax, where any
rounding would otherwise read as a 100% error; every other tensor is judged against its own size.
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

from fullslide.proof import CHECK_MODES

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Default tolerance per dtype: the largest per-tensor error measured on every layout (BENCHMARKS.md) with margin.
TOLERANCES = {"float32": 5e-5, "bfloat16": 1e-2, "float16": 1e-2}
ZERO_FLOOR = 1e-2


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
    aggregator_chunk_tiles: int = 8  # smaller than the slides: the streamed softmax crosses chunks
    dtype: str = "float32"
    drop_rate: float = 0.1
    drop_path_rate: float = 0.1
    steps: int = 3
    micro_batches: int = 2  # engine calls accumulated into one optimizer step
    probes: bool = True
    lr: float = 1e-2
    weight_decay: float = 1e-3  # reveals a zeros-for-None gradient; small, so a pure-decay update stays under the floor
    seed: int = 0
    device: str = "cpu"
    modes: list[str] = field(default_factory=lambda: list(CHECK_MODES))
    tile_parallel: list[int] | None = None  # None: every divisor of the process count
    encoder_kwargs: dict = field(default_factory=dict)  # e.g. a recipe at reduced depth: {"depth": 2}
    trainable_blocks: int | None = None  # fine-tuning controls of fullslide.models.finetune
    lora_rank: int = 0
    lora_dropout: float = 0.1
    grad_checkpointing: bool = False

    def k_of(self, slide: int) -> int:
        return self.tiles[slide % len(self.tiles)]

    def layouts(self, nproc: int) -> list[int]:
        options = self.tile_parallel or [d for d in range(1, nproc + 1) if nproc % d == 0]
        return [t for t in options if nproc % t == 0]


def build_model(spec: CheckSpec, device: torch.device) -> torch.nn.Module:
    """The model under test (with the probes), initialised identically in every process."""
    from fullslide.models import create_model
    from fullslide.proof.probes import add_probes

    from fullslide.models import finetune

    torch.manual_seed(spec.seed)
    model = create_model(
        spec.encoder, spec.aggregator, spec.n_classes, weights=spec.weights, tile_px=spec.tile_px,
        drop_rate=spec.drop_rate, drop_path_rate=spec.drop_path_rate, encoder_kwargs=spec.encoder_kwargs,
    )
    if spec.lora_rank:
        finetune.add_lora(model.encoder, spec.lora_rank, 16.0, spec.lora_dropout, ["qkv", "fc1"])
        for block in finetune.transformer_blocks(model.encoder):  # B starts at 0: make the adapters matter
            for module in block.modules():
                if isinstance(module, finetune.LoRALinear):
                    torch.nn.init.normal_(module.lora_b, std=0.02)
    if spec.trainable_blocks is not None:
        finetune.train_last_blocks(model.encoder, spec.trainable_blocks)
    if spec.grad_checkpointing:
        finetune.set_block_checkpointing(model.encoder, True)
    if spec.probes:
        add_probes(model, spec.drop_path_rate)
    return model.to(device).train()


def _same_kernels(device: torch.device) -> None:
    """One intra-op thread on CPU in the reference and in every worker: oneDNN picks its reduction blocking by
    thread count, and a conv-bias gradient summed over K x H x W positions then differs by ~1e-5 between 1 and
    2 threads - a kernel difference, not the engine's. (On GPU each process owns its device.)"""
    if device.type == "cpu":
        torch.set_num_threads(1)


def make_slides(spec: CheckSpec, step_seed: int) -> list[torch.Tensor]:
    """Deterministic uint8 tiles ``[K_i, 3, P, P]`` for every slide of one engine call."""
    out = []
    for i in range(spec.slides):
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + step_seed * 1009 + i)
        out.append(torch.randint(0, 256, (spec.k_of(i), 3, spec.tile_px, spec.tile_px), generator=gen, dtype=torch.uint8))
    return out


def targets_of(spec: CheckSpec) -> torch.Tensor:
    return torch.arange(spec.slides) % spec.n_classes


def _scaled_ce(scale: float):
    """Cross-entropy times a fixed loss scale (float16 runs: keeps small gradients representable)."""
    return F.cross_entropy if scale == 1.0 else (lambda z, y: F.cross_entropy(z, y) * scale)


class _MasterSGD:
    """SGD (momentum 0.9, weight decay) on float64 master copies of the parameters.

    Updates are compared as ``master_after - master_before``: with float32 parameters the subtraction alone would
    carry an error of one float32 ulp of the parameter (1e-4 of a 3e-5 update on a 4e-2 weight), hiding the
    gradient's own error. Like ``torch.optim.SGD``, a parameter whose ``.grad`` is None is skipped entirely.
    """

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, momentum: float = 0.9) -> None:
        self.params = dict(model.named_parameters())
        self.master = {n: p.detach().double().clone() for n, p in self.params.items()}
        self.start = {n: m.clone() for n, m in self.master.items()}
        self.buf: dict[str, torch.Tensor] = {}
        self.lr, self.wd, self.momentum = lr, weight_decay, momentum

    @torch.no_grad()
    def step(self, inv_scale: float = 1.0) -> None:
        for n, p in self.params.items():
            if p.grad is None:
                continue
            d = p.grad.double() * inv_scale + self.wd * self.master[n]
            self.buf[n] = d if n not in self.buf else self.momentum * self.buf[n] + d
            self.master[n] -= self.lr * self.buf[n]
            p.copy_(self.master[n])

    def updates(self) -> dict[str, torch.Tensor]:
        return {n: (self.master[n] - self.start[n]).cpu() for n in self.master}


def _train(spec: CheckSpec, model: torch.nn.Module, run_call) -> tuple[dict, dict, float]:
    """``spec.steps`` SGD steps of ``spec.micro_batches`` calls each; return (grads after step 1, updates, peak MB)."""
    from fullslide.engine.memory import PeakRSS

    device = next(model.parameters()).device
    # SGD with momentum, as the paper's own equivalence test: updates stay linear in the gradients. Adam would
    # divide rounding noise on analytically-zero gradients by its own tiny magnitude (it measures Adam, not the
    # engine). Weight decay makes a gradient of zeros where one process has None change the trajectory.
    opt = _MasterSGD(model, spec.lr, spec.weight_decay)
    scale = 1024.0 if spec.dtype == "float16" else 1.0  # a fixed loss scale: no skipped steps to compare
    grads: dict[str, torch.Tensor] = {}
    peak = 0.0
    for s in range(spec.steps):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        with PeakRSS() as rss:
            for m in range(spec.micro_batches):
                seed = s * spec.micro_batches + m
                run_call(seed, make_slides(spec, seed), scale)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device) / 2**20)
        else:
            peak = max(peak, rss.peak_growth_bytes / 2**20)
        if s == 0:
            grads = {n: p.grad.detach().double().cpu() / scale for n, p in model.named_parameters()
                     if p.grad is not None}
        opt.step(1.0 / scale)
    return grads, opt.updates(), peak


@dataclass
class Reference:
    """The reference's results, and how often the streamed softmax had its maximum beyond the first chunk."""

    grads: dict
    updates: dict
    peak_mb: float
    late_peaks: int = 0
    pooled_slides: int = 0


def reference(spec: CheckSpec) -> Reference:
    """The single-process reference, computed in this process without the engine."""
    from fullslide.proof.reference import reference_step

    device = torch.device(spec.device)
    _same_kernels(device)
    model = build_model(spec, device)
    scores: list[torch.Tensor | None] = []

    def run(seed: int, slides: list[torch.Tensor], scale: float) -> None:
        reference_step(model, slides, targets_of(spec), _scaled_ce(scale), chunk_tiles=spec.chunk_tiles,
                       aggregator_chunk_tiles=spec.aggregator_chunk_tiles, step_seed=seed,
                       amp_dtype=DTYPES[spec.dtype], scores_out=scores)

    grads, updates, peak = _train(spec, model, run)
    pooled = [a for a in scores if a is not None]
    late = sum(int(a.argmax()) >= spec.aggregator_chunk_tiles for a in pooled)
    return Reference(grads, updates, peak, late, len(pooled))


def auto_budget(mode: str, model: torch.nn.Module, bags: list, spec: CheckSpec) -> tuple[str, int | None]:
    """(engine mode, memory budget) of a check mode: ``auto-all`` / ``auto-none`` give budgets every chunk
    graph fits / none fits; ``auto-half`` the predicted bytes of keeping half of this rank's tiles."""
    from fullslide.engine.budget import probe_encoder, step_bytes

    if not mode.startswith("auto-"):
        return mode, None
    if mode == "auto-all":
        return "auto", 10**15
    mine = [b for b in bags if b.tiles is not None and b.k_local]
    if mode == "auto-none" or not mine:
        return "auto", 1
    device = next(model.parameters()).device
    probe = probe_encoder(model.encoder, mine[0].tiles, device=device, amp_dtype=DTYPES[spec.dtype],
                          aggregator=model.aggregator)
    total = sum(b.k_local for b in mine)
    agg = min(spec.aggregator_chunk_tiles, max(b.k_total for b in bags))
    return "auto", step_bytes(probe, kept_tiles=total // 2, chunk_tiles=spec.chunk_tiles, total_tiles=total,
                              aggregator_tiles=agg)


def worker_main(spec_path: str, out_dir: str) -> None:
    """One rank of a launch: every (layout, mode) of the spec; every rank writes its results."""
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

            def run(seed: int, slides: list[torch.Tensor], scale: float, mode=mode, model=model, mine=mine,
                    ctx=ctx) -> None:
                bags = []
                for i in mine:
                    start, stop = rank_tile_range(len(slides[i]), spec.chunk_tiles, ctx.tp_rank, ctx.tp_size)
                    bags.append(Bag(index=i, tiles=slides[i][start:stop], k_total=len(slides[i])))
                engine_mode, budget = auto_budget(mode, model, bags, spec)
                step(model, bags, targets_of(spec), _scaled_ce(scale), mode=engine_mode, memory_budget=budget,
                     chunk_tiles=spec.chunk_tiles, aggregator_chunk_tiles=spec.aggregator_chunk_tiles, step_seed=seed,
                     amp_dtype=DTYPES[spec.dtype], parallel=ctx)

            grads, updates, peak = _train(spec, model, run)
            tag = Path(out_dir) / f"n{world}_t{tp}_{mode}_r{ctx.rank}"
            save_file(grads, f"{tag}_grads.safetensors")
            save_file(updates, f"{tag}_updates.safetensors")
            Path(f"{tag}.json").write_text(json.dumps({"peak_mb": peak}))
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
        cmd = [sys.executable, "-m", "fullslide.proof.checkgrad", str(spec_path), str(out_dir)]
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


def tensor_errors(ours: dict, ref: dict, prefix: str) -> dict[str, float]:
    """Per-tensor relative error of the tensors named ``prefix*`` (module docstring); inf where ``ours`` lacks one."""
    names = [n for n in ref if n.startswith(prefix)]
    scale = max((float(ref[n].abs().max()) for n in names if ref[n].numel()), default=0.0)
    errors = {}
    for name in names:
        if name not in ours:
            errors[name] = float("inf")
            continue
        diff = float((ours[name] - ref[name]).abs().max()) if ref[name].numel() else 0.0
        denom = max(float(ref[name].abs().max()) if ref[name].numel() else 0.0, ZERO_FLOOR * scale)
        errors[name] = diff / denom if denom > 0 else diff
    return errors


def max_rel_error(ours: dict, ref: dict, prefix: str = "") -> float:
    """The worst per-tensor error among tensors named ``prefix*`` (and inf if ``ours`` has a tensor ``ref`` lacks)."""
    if any(n.startswith(prefix) and n not in ref for n in ours):
        return float("inf")
    return max(tensor_errors(ours, ref, prefix).values(), default=0.0)


@dataclass
class CheckRow:
    """One line of the check-grad table (the worst rank of the configuration)."""

    nproc: int
    tile_parallel: int
    mode: str
    encoder_grad: float
    aggregator_grad: float
    updates: float
    peak_mb: float
    ok: bool
    worst: str = ""  # tensor@rank with the largest error
    error: str = ""

    @property
    def slide_groups(self) -> int:
        return self.nproc // self.tile_parallel


def compare_rank(grads: dict, updates: dict, ref: Reference) -> tuple[tuple[float, float, float], str, str]:
    """(encoder, aggregator, update) errors of one rank, its worst tensor, and a presence mismatch if any."""
    extra, missing = sorted(set(grads) - set(ref.grads)), sorted(set(ref.grads) - set(grads))
    problem = ""
    if extra or missing:
        problem = f"grad presence differs: has {extra[:3]} the reference has not, lacks {missing[:3]}"
    errs = {f"{kind} {n}": e for kind, ours, theirs in (("grad", grads, ref.grads), ("update", updates, ref.updates))
            for part in ("encoder.", "aggregator.") for n, e in tensor_errors(ours, theirs, part).items()}
    groups = (
        max([e for n, e in errs.items() if n.startswith("grad encoder.")], default=0.0),
        max([e for n, e in errs.items() if n.startswith("grad aggregator.")], default=0.0),
        max([e for n, e in errs.items() if n.startswith("update ")], default=0.0),
    )
    if problem:
        groups = tuple(float("inf") for _ in groups)
    worst = max(errs, key=errs.get) if errs else ""
    return groups, worst, problem


def run_checks(spec: CheckSpec, nprocs: list[int], tol: float, progress=print) -> tuple[list[CheckRow], Reference]:
    """Reference + every launch; returns the rows (worst rank of each configuration) and the reference."""
    from safetensors.torch import load_file

    ref = reference(spec)
    rows: list[CheckRow] = []
    with tempfile.TemporaryDirectory(prefix="fullslide-checkgrad-") as tmp:
        for nproc in nprocs:
            progress(f"check-grad: launching {nproc} process(es) for layouts {spec.layouts(nproc)} x modes {spec.modes}")
            try:
                launch(spec, nproc, Path(tmp))
            except RuntimeError as exc:
                rows += [CheckRow(nproc, tp, m, float("inf"), float("inf"), float("inf"), 0.0, False, error=str(exc))
                         for tp in spec.layouts(nproc) for m in spec.modes]
                continue
            for tp in spec.layouts(nproc):
                for mode in spec.modes:
                    worst_errs, worst_name, problems, peak = (0.0, 0.0, 0.0), "", [], 0.0
                    for rank in range(nproc):
                        tag = Path(tmp) / f"n{nproc}_t{tp}_{mode}_r{rank}"
                        errs, name, problem = compare_rank(load_file(f"{tag}_grads.safetensors"),
                                                           load_file(f"{tag}_updates.safetensors"), ref)
                        if problem:
                            problems.append(f"rank {rank}: {problem}")
                        if max(errs) >= max(worst_errs):
                            worst_name = f"{name.replace(' ', ':')}@{rank}"
                        worst_errs = tuple(max(a, b) for a, b in zip(worst_errs, errs))
                        peak = max(peak, json.loads(Path(f"{tag}.json").read_text())["peak_mb"])
                    rows.append(CheckRow(nproc, tp, mode, *worst_errs, peak, ok=max(worst_errs) <= tol,
                                         worst=worst_name, error="; ".join(problems[:2])))
    return rows, ref


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])
