"""``fullslide check-grad``: prove on your own hardware that every engine configuration gives the gradient of
one process and one autograd graph.

The parent process computes the reference (:mod:`fullslide.proof.reference`, which shares no code with the
engine). For every process count it then launches that many workers itself, the way torchrun would (env://
rendezvous on localhost; NCCL on GPUs, gloo on CPUs); the workers run every tile-parallel layout and memory
mode on the same model, tiles and seeds, and *every* rank writes what it ends with. What is compared:

- the gradient of every one of ``steps`` SGD steps (momentum 0.9, weight decay), each accumulating
  ``micro_batches`` engine calls without zeroing in between (so a step that drops or re-reduces a pre-existing
  ``.grad`` shows), and the parameter update the optimizer makes from it (per-parameter learning rates where
  layer-wise decay is on: fullslide's optimizer groups in the workers, the rule written again in the reference);
- which parameters have a gradient at all (an unused parameter must keep ``.grad = None``);
- the buffers after the last step, and that a step leaves the parameters and the global RNG untouched.

Every step starts from the reference's weights of that step (:mod:`fullslide.proof.compare` says why); float16
runs use a real ``torch.amp.GradScaler``, handed to the engine as training does.

The model carries the probes of :mod:`fullslide.proof.probes` (tied, frozen and unused parameters, drop-path)
and attention pooling streams over chunks of ``aggregator_chunk_tiles`` tiles, smaller than a slide, so the
online softmax must rescale when a later chunk holds the highest score (the reference reports how often).

``check-grad --suite`` runs the scenarios of :mod:`fullslide.proof.suite` (every aggregator, bf16 and fp16,
the fine-tuning controls, long peaked slides, the default resnet18 + GMA) in one launch per process count.
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
from fullslide.proof.compare import (  # noqa: F401 (re-exported)
    ZERO_FLOOR, CheckRow, compare_steps, max_rel_error, rounding_noise, tensor_errors, tolerances,
)

from fullslide.proof.trajectory import Trajectory, load_run, save_run, train_steps

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
    layer_decay: float = 1.0  # < 1: per-layer learning rates (the optimizer's view is compared)
    attention_scale: float = 1.0  # > 1: sharper attention scores (peaked pooling)
    context_tiles: list[int] | None = None  # whole-slide context: cached feature rows per slide (cycled), or None
    aggregator_kwargs: dict = field(default_factory=dict)  # e.g. {"alibi": True}: a spatial aggregator
    nprocs: list[int] | None = None  # process counts this spec runs at (None: every one asked for)
    name: str = ""  # the scenario's name in a suite
    tol: float | None = None  # None: the dtype's default (fullslide.proof.compare.tolerances)

    def k_of(self, slide: int) -> int:
        return self.tiles[slide % len(self.tiles)]

    def layouts(self, nproc: int) -> list[int]:
        if self.nprocs is not None and nproc not in self.nprocs:
            return []
        options = self.tile_parallel or [d for d in range(1, nproc + 1) if nproc % d == 0]
        return [t for t in options if nproc % t == 0]

    def describe(self) -> str:
        ks = ",".join(str(self.k_of(i)) for i in range(self.slides))
        extra = "".join(f" {k}={v}" for k, v in (("context_rows", self.context_tiles),
                                                    ("lora_rank", self.lora_rank), ("trainable_blocks", self.trainable_blocks),
                                                    ("grad_checkpointing", self.grad_checkpointing),
                                                    ("layer_decay", self.layer_decay), ("attention_scale", self.attention_scale))
                        if v not in (0, None, False, 1.0))
        return (f"encoder={self.encoder} aggregator={self.aggregator} tile={self.tile_px}px K=[{ks}] chunk={self.chunk_tiles} "
                f"agg_chunk={self.aggregator_chunk_tiles} dtype={self.dtype}{' +GradScaler' if self.dtype == 'float16' else ''} "
                f"device={self.device} steps={self.steps}x{self.micro_batches} probes={'on' if self.probes else 'off'}{extra}")


def build_model(spec: CheckSpec, device: torch.device, *, reference: bool = False) -> torch.nn.Module:
    """The model under test (with the probes), initialised identically in every process.

    The reference's model applies ``trainable_blocks`` by its own rule (:mod:`fullslide.proof.reference`) and no
    block checkpointing (which must not change the gradient), so a bug in either shows as a difference.
    """
    from fullslide.models import create_model, finetune
    from fullslide.proof.probes import add_probes
    from fullslide.proof.reference import train_only_last_blocks

    torch.manual_seed(spec.seed)
    model = create_model(
        spec.encoder, spec.aggregator, spec.n_classes, weights=spec.weights, tile_px=spec.tile_px,
        drop_rate=spec.drop_rate, drop_path_rate=spec.drop_path_rate, encoder_kwargs=spec.encoder_kwargs,
        aggregator_kwargs=spec.aggregator_kwargs,
    )
    if spec.lora_rank:
        finetune.add_lora(model.encoder, spec.lora_rank, 16.0, spec.lora_dropout, ["qkv", "fc1"])
        for block in finetune.transformer_blocks(model.encoder):  # B starts at 0: make the adapters matter
            for module in block.modules():
                if isinstance(module, finetune.LoRALinear):
                    torch.nn.init.normal_(module.lora_b, std=0.02)
    if spec.trainable_blocks is not None:
        (train_only_last_blocks if reference else finetune.train_last_blocks)(model.encoder, spec.trainable_blocks)
    if spec.grad_checkpointing and not reference:
        finetune.set_block_checkpointing(model.encoder, True)
    if spec.probes:
        add_probes(model, spec.drop_path_rate, spec.attention_scale)
    return model.to(device).train()


def learning_rates(spec: CheckSpec, model: torch.nn.Module, *, reference: bool) -> dict[str, tuple[float, float]]:
    """(lr, weight decay) of every parameter as the optimizer sees it: fullslide's layer-decay groups in the
    workers, the rule written again from its specification in the reference; uniform without layer decay."""
    rates = {id(p): (spec.lr, spec.weight_decay) for p in model.parameters()}
    encoder = model.encoder.inner if spec.probes else model.encoder  # the probes keep the base rate
    if spec.layer_decay < 1:
        if reference:
            from fullslide.proof.reference import layer_decayed_lrs

            rates.update(layer_decayed_lrs(encoder, spec.lr, spec.weight_decay, spec.layer_decay))
        else:
            from fullslide.models.finetune import layer_decay_groups

            for group in layer_decay_groups(encoder, spec.lr, spec.weight_decay, spec.layer_decay):
                rates.update({id(p): (group["lr"], group["weight_decay"]) for p in group["params"]})
    return {n: rates[id(p)] for n, p in model.named_parameters()}


def _same_kernels(device: torch.device) -> None:
    """One intra-op thread on CPU in the reference and in every worker: oneDNN picks its reduction blocking by
    thread count, and a conv-bias gradient summed over K x H x W positions then differs by ~1e-5 between 1 and
    2 threads - a kernel difference, not the engine's. (On GPU each process owns its device.)"""
    if device.type == "cpu":
        torch.set_num_threads(1)


def make_slides(spec: CheckSpec, step_seed: int) -> list[torch.Tensor]:
    """Deterministic uint8 tiles ``[K_i, 3, P, P]`` for every slide of one engine call.

    Tiles differ as tiles of a slide do: each has its own colour, brightness and contrast, plus pixel noise
    (uniform noise alone gives every tile the same statistics, and a random encoder then gives them nearly the
    same features, which would make attention uniform and hide bugs that depend on which tile is which)."""
    out = []
    for i in range(spec.slides):
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + step_seed * 1009 + i)
        k, px = spec.k_of(i), spec.tile_px
        base = torch.rand((k, 3, 1, 1), generator=gen) * 255  # per-tile colour
        contrast = torch.rand((k, 1, 1, 1), generator=gen) * 1.5
        noise = torch.randn((k, 3, px, px), generator=gen) * 40
        out.append((base + contrast * noise).clamp(0, 255).to(torch.uint8))
    return out


def make_contexts(spec: CheckSpec, step_seed: int, dim: int) -> list[torch.Tensor | None]:
    """Deterministic context rows ``[M_i, D]`` per slide (a feature cache's rows; the same on every rank), or
    Nones without context. M may be 0 (a slide whose K tiles are all its tiles)."""
    if spec.context_tiles is None:
        return [None] * spec.slides
    out = []
    for i in range(spec.slides):
        gen = torch.Generator().manual_seed(spec.seed * 7919 + step_seed * 104_729 + i)
        m = spec.context_tiles[i % len(spec.context_tiles)]
        out.append(torch.randn((m, dim), generator=gen) * (1 + torch.rand((m, 1), generator=gen)))
    return out


def make_positions(spec: CheckSpec, step_seed: int) -> list[torch.Tensor]:
    """Deterministic grid positions ``[K_i + M_i, 2]`` of every slide's K tiles then its M context rows: distinct
    cells of a slide-sized grid, in a shuffled order (tile order on a slide is not spatial order)."""
    out = []
    for i in range(spec.slides):
        gen = torch.Generator().manual_seed(spec.seed * 31 + step_seed * 7 + i)
        m = spec.context_tiles[i % len(spec.context_tiles)] if spec.context_tiles is not None else 0
        n = spec.k_of(i) + m
        side = int(n**0.5) + 3
        cells = torch.randperm(side * side, generator=gen)[:n]
        out.append(torch.stack([cells % side, cells // side], dim=1).float())
    return out


def targets_of(spec: CheckSpec) -> torch.Tensor:
    return torch.arange(spec.slides) % spec.n_classes


@dataclass
class Reference:
    """The reference's trajectory, and how hard its attention pooling was on the streamed path."""

    run: Trajectory
    noise: list = field(default_factory=list)  # per step: one-ulp rounding noise of each gradient and update
    problem: str = ""  # why the reference cannot judge (it is not reproducible)
    late_peaks: int = 0  # slide-calls whose highest attention score lies beyond the first tile-stage chunk
    pooled_slides: int = 0
    faint_chunks: int = 0  # tile-stage chunks whose attention weights were all below 1e-3
    chunks: int = 0


def _one_ulp(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``weights`` with every element moved by one float32 ulp up or down (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: w * (1 + 2.0**-23 * (torch.randint(0, 2, w.shape, generator=gen, dtype=w.dtype) * 2 - 1))
            for n, w in weights.items()}


def reference(spec: CheckSpec) -> Reference:
    """The single-process reference, computed in this process without the engine; then again from the same
    weights, which must give the same result (a random draw outside the seeding contract, e.g. from a private
    generator, or a non-deterministic kernel, would make every comparison meaningless); then, in float32, once
    more from weights one ulp away, which measures each tensor's rounding noise (:mod:`fullslide.proof.compare`:
    in bf16/fp16 a one-ulp change re-rounds activations the engine computes exactly as the reference does, so the
    low-precision tolerances judge without it)."""
    from fullslide.proof.reference import reference_step

    device = torch.device(spec.device)
    _same_kernels(device)
    scores: list[torch.Tensor | None] = []

    def trajectory(starts: list[dict[str, torch.Tensor]] | None) -> Trajectory:
        model = build_model(spec, device, reference=True)

        def run(seed: int, slides: list[torch.Tensor], scaler) -> None:
            reference_step(model, slides, targets_of(spec), F.cross_entropy, chunk_tiles=spec.chunk_tiles,
                           aggregator_chunk_tiles=spec.aggregator_chunk_tiles, step_seed=seed,
                           amp_dtype=DTYPES[spec.dtype], scores_out=scores if starts is None else None,
                           grad_scaler=scaler, contexts=make_contexts(spec, seed, model.encoder.feature_dim),
                           positions=make_positions(spec, seed))

        return train_steps(spec, model, run, learning_rates(spec, model, reference=True), starts)

    run_ = trajectory(None)
    ref = Reference(run_)
    repeat = trajectory(run_.starts)
    errs, ok, worst, problems = compare_steps(repeat.steps, repeat.buffers, run_.steps, run_.buffers,
                                              tolerances(spec.dtype, spec.tol))
    if not ok or problems:
        ref.problem = (f"the reference is not reproducible: a second run from the same weights differs ({worst}: "
                       f"{max(errs):.1e}{'; ' + problems[0] if problems else ''}); some random draw is outside the "
                       "seeding contract (a private generator?) or a kernel is not deterministic")
    if spec.dtype == "float32":
        perturbed = trajectory([_one_ulp(w, spec.seed + s) for s, w in enumerate(run_.starts)])
        ref.noise = rounding_noise(perturbed.steps, run_.steps)
    for a in (a for a in scores if a is not None):
        w = torch.softmax(a.double(), 0)
        ref.pooled_slides += 1
        ref.late_peaks += int(a.argmax()) >= spec.aggregator_chunk_tiles
        for part in w.split(spec.aggregator_chunk_tiles):
            ref.chunks += 1
            ref.faint_chunks += bool(part.max() < 1e-3)
    return ref


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


def worker_main(specs_path: str, out_dir: str) -> None:
    """One rank of a launch: every (spec, layout, mode) that runs at this world size; every rank writes."""
    import torch.distributed as dist

    from fullslide.engine import Bag, init_parallel, rank_tile_range, slides_for_group, step

    specs = [CheckSpec(**d) for d in json.loads(Path(specs_path).read_text())]
    world = int(os.environ["WORLD_SIZE"])
    contexts: dict[int, object] = {}
    for index, spec in enumerate(specs):
        _same_kernels(torch.device(spec.device))
        layouts = spec.layouts(world)
        if not layouts:
            continue
        ref = load_run(Path(out_dir) / f"ref{index}", spec.steps)
        starts = ref.starts
        noise = json.loads((Path(out_dir) / f"ref{index}.noise.json").read_text())
        limits = tolerances(spec.dtype, spec.tol)
        for tp in layouts:
            ctx = contexts.setdefault(tp, init_parallel(tile_parallel=tp))
            for mode in spec.modes:
                model = build_model(spec, ctx.device)
                mine = slides_for_group(spec.slides, ctx.dims.slide_groups, ctx.slide_group)

                def run(seed: int, slides: list[torch.Tensor], scaler, mode=mode, model=model, mine=mine, ctx=ctx,
                        spec=spec) -> None:
                    bags = []
                    contexts = make_contexts(spec, seed, model.encoder.feature_dim)
                    positions = make_positions(spec, seed)
                    for i in mine:
                        start, stop = rank_tile_range(len(slides[i]), spec.chunk_tiles, ctx.tp_rank, ctx.tp_size)
                        k = len(slides[i])
                        bags.append(Bag(index=i, tiles=slides[i][start:stop], k_total=k, context=contexts[i],
                                        positions=positions[i][:k], context_positions=positions[i][k:]))
                    engine_mode, budget = auto_budget(mode, model, bags, spec)
                    step(model, bags, targets_of(spec), F.cross_entropy, mode=engine_mode, memory_budget=budget,
                         chunk_tiles=spec.chunk_tiles, aggregator_chunk_tiles=spec.aggregator_chunk_tiles,
                         step_seed=seed, amp_dtype=DTYPES[spec.dtype], grad_scaler=scaler, parallel=ctx)

                result = train_steps(spec, model, run, learning_rates(spec, model, reference=False), starts)
                # judged here, against the reference's file: only the verdict is written (every step's gradients
                # and updates in float64 would take tens of GB over the suite)
                errs, ok, worst, problems = compare_steps(result.steps, result.buffers, ref.steps, ref.buffers,
                                                          limits, noise)
                verdict = {"errs": list(errs), "ok": ok, "worst": worst, "problems": result.problems + problems,
                           "peak_mb": result.peak_mb}
                Path(out_dir, f"s{index}_n{world}_t{tp}_{mode}_r{ctx.rank}.json").write_text(json.dumps(verdict))
        del ref, starts
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(specs: list[CheckSpec], nproc: int, out_dir: Path, timeout_s: float = 1800.0) -> None:
    """Start ``nproc`` workers with torchrun's environment and wait; raise with the failing rank's stderr."""
    spec_path = out_dir / f"specs_{nproc}.json"
    spec_path.write_text(json.dumps([dataclasses.asdict(s) for s in specs]))
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
        except BaseException:  # SIGTERM/Ctrl-C of check-grad: its workers go too (then the temporary folder)
            for q in procs:
                q.kill()
                q.wait()
            raise
        if p.returncode != 0:
            failures.append(f"rank {rank} exited {p.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    if failures:
        raise RuntimeError(f"--nproc {nproc}: " + "; ".join(failures))


def run_checks(specs: CheckSpec | list[CheckSpec], nprocs: list[int], tol: float | None = None,
               progress=print) -> tuple[list[CheckRow], Reference | list[Reference]]:
    """References + one launch per process count for all specs; returns the rows (worst rank and step of each
    configuration) and the reference(s). ``tol`` overrides every spec's tolerance."""
    single = isinstance(specs, CheckSpec)
    specs = [specs] if single else list(specs)
    if tol is not None:  # the workers judge with each spec's tolerance
        specs = [dataclasses.replace(s, tol=tol) for s in specs]
    rows: list[CheckRow] = []
    with tempfile.TemporaryDirectory(prefix="fullslide-checkgrad-") as tmp:
        refs = []
        for index, spec in enumerate(specs):
            progress(f"check-grad: reference for {spec.name or 'the check'}")
            refs.append(reference(spec))
            save_run(refs[-1].run, Path(tmp) / f"ref{index}", starts=True)
            (Path(tmp) / f"ref{index}.noise.json").write_text(json.dumps(refs[-1].noise))
        for nproc in nprocs:
            todo = [(i, s) for i, s in enumerate(specs) if s.layouts(nproc)]
            if not todo:
                continue
            progress(f"check-grad: launching {nproc} process(es) for {len(todo)} check(s)")
            try:
                launch(specs, nproc, Path(tmp))
            except RuntimeError as exc:
                rows += [CheckRow(nproc, tp, m, float("inf"), float("inf"), float("inf"), 0.0, False, error=str(exc),
                                  scenario=s.name) for _, s in todo for tp in s.layouts(nproc) for m in s.modes]
                continue
            for index, spec in todo:
                for tp in spec.layouts(nproc):
                    for mode in spec.modes:
                        rows.append(_row(spec, refs[index], Path(tmp), index, nproc, tp, mode))
    return rows, (refs[0] if single else refs)


def _row(spec: CheckSpec, ref: Reference, tmp: Path, index: int, nproc: int, tp: int, mode: str) -> CheckRow:
    """The worst rank of one configuration, from the verdicts the ranks wrote."""
    worst_errs, worst_name, problems, peak, ok = (0.0, 0.0, 0.0), "", [], 0.0, True
    for rank in range(nproc):
        verdict = json.loads((tmp / f"s{index}_n{nproc}_t{tp}_{mode}_r{rank}.json").read_text())
        errs = tuple(float(e) for e in verdict["errs"])
        problems += [f"rank {rank}: {p}" for p in verdict["problems"]]
        if max(errs) >= max(worst_errs) or not worst_name:
            worst_name = f"{verdict['worst']}@{rank}"
        worst_errs = tuple(max(a, b) for a, b in zip(worst_errs, errs))
        ok = ok and verdict["ok"] and not verdict["problems"]
        peak = max(peak, float(verdict["peak_mb"]))
    if ref.problem:
        ok, problems = False, [ref.problem] + problems
    return CheckRow(nproc, tp, mode, *worst_errs, peak, ok=ok, worst=worst_name, error="; ".join(problems[:2]),
                    scenario=spec.name)


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])
