"""One process's run of a check: SGD steps on float64 master weights, each optionally started from given weights
(the reference's), with what a step must leave alone watched; saved and loaded as safetensors + JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from fullslide.proof.compare import StepRecord

if TYPE_CHECKING:
    from fullslide.proof.checkgrad import CheckSpec

FP16_LOSS_SCALE = 1024.0  # GradScaler's initial scale in float16 checks (no growth: every step is compared)


class _MasterSGD:
    """SGD (momentum 0.9, per-parameter lr and weight decay) on float64 master copies of the parameters.

    Updates are ``master_after - master_before``: with float32 parameters the subtraction alone would carry an
    error of one float32 ulp of the parameter, hiding the gradient's own error. Like ``torch.optim.SGD``, a
    parameter whose ``.grad`` is None is skipped entirely. ``load`` starts a step from given weights.
    """

    def __init__(self, model: torch.nn.Module, rates: dict[str, tuple[float, float]], momentum: float = 0.9) -> None:
        self.params = dict(model.named_parameters())
        self.master = {n: p.detach().double().clone() for n, p in self.params.items()}
        self.buf: dict[str, torch.Tensor] = {}
        self.rates, self.momentum = rates, momentum

    @torch.no_grad()
    def load(self, weights: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            self.master[n] = weights[n].to(self.master[n].device, torch.float64).clone()
            p.copy_(self.master[n])

    @torch.no_grad()
    def step(self) -> dict[str, torch.Tensor]:
        """Apply one step; return each parameter's update (float64, CPU)."""
        updates = {}
        for n, p in self.params.items():
            if p.grad is None:
                updates[n] = torch.zeros_like(self.master[n]).cpu()
                continue
            lr, wd = self.rates[n]
            d = p.grad.double() + wd * self.master[n]
            self.buf[n] = d if n not in self.buf else self.momentum * self.buf[n] + d
            before = self.master[n].clone()
            self.master[n] -= lr * self.buf[n]
            p.copy_(self.master[n])
            updates[n] = (self.master[n] - before).cpu()
        return updates


@dataclass
class Trajectory:
    """What one process ends each step with, the buffers after the last step, and what went wrong."""

    steps: list[StepRecord]
    buffers: dict[str, torch.Tensor]
    starts: list[dict[str, torch.Tensor]]  # the weights each step started from
    peak_mb: float = 0.0
    problems: list[str] = field(default_factory=list)


def train_steps(spec: "CheckSpec", model: torch.nn.Module, run_call: Callable, rates: dict[str, tuple[float, float]],
                starts: list[dict[str, torch.Tensor]] | None = None) -> Trajectory:
    """``spec.steps`` SGD steps of ``spec.micro_batches`` calls each; step ``s`` starts from ``starts[s]`` when
    given (the reference's weights), else from where the previous step left off (the reference itself)."""
    from fullslide.engine.memory import PeakRSS
    from fullslide.proof.checkgrad import make_slides

    device = next(model.parameters()).device
    opt = _MasterSGD(model, rates)
    scaler = None
    if spec.dtype == "float16":  # a real GradScaler: the engine scales the loss, the optimizer side unscales
        scaler = torch.amp.GradScaler(device.type, init_scale=FP16_LOSS_SCALE, growth_interval=10**9)
    trainable = [p for p in model.parameters() if p.requires_grad]
    unscaler = torch.optim.SGD(trainable, lr=0.0) if scaler is not None and trainable else None
    out = Trajectory(steps=[], buffers={}, starts=[])
    for s in range(spec.steps):
        if starts is not None:
            opt.load(starts[s])
        out.starts.append({n: m.detach().cpu().clone() for n, m in opt.master.items()})
        params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
        rng_before = torch.get_rng_state()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        with PeakRSS() as rss:
            for m in range(spec.micro_batches):
                seed = s * spec.micro_batches + m
                run_call(seed, make_slides(spec, seed), scaler)
        out.peak_mb = max(out.peak_mb, torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                          else rss.peak_growth_bytes / 2**20)
        changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), params_before[n])]
        if changed:
            out.problems.append(f"step {s + 1} changed parameters {changed[:3]}")
        if not torch.equal(torch.get_rng_state(), rng_before):
            out.problems.append(f"step {s + 1} advanced the global RNG")
        if unscaler is not None:
            scaler.unscale_(unscaler)
            if any(float(v) for v in scaler._found_inf_per_device(unscaler).values()):
                out.problems.append(f"step {s + 1}: the GradScaler found inf/NaN gradients")
            scaler.update()
        grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
        out.steps.append(StepRecord(grads=grads, updates=opt.step()))
    out.buffers = {n: b.detach().double().cpu() for n, b in model.named_buffers()}
    return out


def save_run(run: Trajectory, tag: Path, *, starts: bool = False) -> None:
    """One safetensors file per (spec, layout, mode, rank): every step's gradients and updates, the buffers."""
    from safetensors.torch import save_file

    tensors = {f"b:{n}": t.contiguous() for n, t in run.buffers.items()}
    for s, rec in enumerate(run.steps):
        tensors.update({f"g{s}:{n}": t.contiguous() for n, t in rec.grads.items()})
        tensors.update({f"u{s}:{n}": t.contiguous() for n, t in rec.updates.items()})
        if starts:
            tensors.update({f"w{s}:{n}": t.contiguous() for n, t in run.starts[s].items()})
    save_file(tensors, f"{tag}.safetensors")
    Path(f"{tag}.json").write_text(json.dumps({"peak_mb": run.peak_mb, "problems": run.problems}))


def load_run(tag: Path, steps: int) -> Trajectory:
    from safetensors.torch import load_file

    flat = load_file(f"{tag}.safetensors")
    meta = json.loads(Path(f"{tag}.json").read_text())

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}

    return Trajectory(steps=[StepRecord(part(f"g{s}:"), part(f"u{s}:")) for s in range(steps)], buffers=part("b:"),
                      starts=[part(f"w{s}:") for s in range(steps)], peak_mb=meta["peak_mb"], problems=meta["problems"])


