"""How check-grad judges one rank's results against the reference: per-tensor relative errors, per step.

Error of a tensor: ``max |a - b| / max(max |b|, ZERO_FLOOR * G)``, where ``G`` is the largest ``|b|`` of its
group (encoder gradients, aggregator gradients, encoder updates, aggregator updates). The floor only matters for
tensors whose reference is (analytically) zero to within ``ZERO_FLOOR`` of the group, like an attention bias
under softmax, where any rounding would otherwise read as a 100% error; every other tensor is judged against its
own size. A check must also be well-conditioned before it judges: the reference is computed a second time from
weights perturbed by one float32 ulp, and the difference, a tensor's *rounding noise*, raises its denominator to at
least ``NOISE_MULT * noise / tol``, so a tensor whose value rounding alone moves (an analytically zero gradient; a
sharply peaked softmax) may differ by ``NOISE_MULT`` times what one ulp does to it, and no more.

Every step is compared from the same starting weights: each rank starts step ``s`` from the reference's weights
of step ``s`` (teacher forcing). A comparison of free-running trajectories is ill-conditioned: a model such as
resnet18 + GMA amplifies a one-ulp weight difference ~10^4-fold over three SGD steps, so two exact
implementations drift apart by float32 rounding alone. From shared weights each step's gradient and update is as
well-conditioned as the first; what a step leaves behind that the next one reads (buffers, the momentum
built from this rank's own gradients, parameters or RNG a step must not touch) is compared too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ZERO_FLOOR = 1e-2
#: How many times the one-ulp rounding noise of a tensor its difference may reach (measured: BENCHMARKS.md).
NOISE_MULT = 10.0
#: Default tolerance per dtype for the encoder's gradients and updates: the largest per-tensor error measured on
#: every scenario of ``check-grad --suite`` (BENCHMARKS.md) with margin.
TOLERANCES = {"float32": 5e-5, "bfloat16": 1e-2, "float16": 1e-2}
#: The aggregator and the loss run in float32 whatever the encoder's precision: its gradients are judged at this
#: tolerance in every dtype (they differ only by float32 rounding of the same bf16/fp16 features).
AGGREGATOR_TOLERANCE = 5e-4


def tolerances(dtype: str, tol: float | None = None) -> tuple[float, float]:
    """(encoder, aggregator) tolerance of a dtype; ``tol`` (the user's ``--tol``) overrides both."""
    if tol is not None:
        return tol, tol
    enc = TOLERANCES[dtype]
    return enc, min(enc, AGGREGATOR_TOLERANCE) if dtype != "float32" else enc


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if b.numel() else 0.0


def tensor_errors(ours: dict, ref: dict, prefix: str, noise: dict | None = None, tol: float = 1.0) -> dict[str, float]:
    """Per-tensor relative error of the tensors named ``prefix*`` (module docstring); inf where ``ours`` lacks one.
    ``noise`` maps a name to its one-ulp rounding noise (max abs), judged against ``tol``."""
    names = [n for n in ref if n.startswith(prefix)]
    scale = max((float(ref[n].abs().max()) for n in names if ref[n].numel()), default=0.0)
    errors = {}
    for name in names:
        if name not in ours:
            errors[name] = float("inf")
            continue
        diff = _max_abs_diff(ours[name], ref[name])
        denom = max(float(ref[name].abs().max()) if ref[name].numel() else 0.0, ZERO_FLOOR * scale,
                    NOISE_MULT * (noise or {}).get(name, 0.0) / tol if tol > 0 else 0.0)
        errors[name] = diff / denom if denom > 0 else diff
    return errors


def rounding_noise(perturbed: list[StepRecord], ref: list[StepRecord]) -> list[dict[str, dict[str, float]]]:
    """Per step, per kind ("grad", "update"), per tensor: how far a one-ulp perturbed reference moved it."""
    return [{kind: {n: _max_abs_diff(getattr(p, kind + "s")[n], t) for n, t in getattr(r, kind + "s").items()
                    if n in getattr(p, kind + "s")} for kind in ("grad", "update")} for p, r in zip(perturbed, ref)]


def max_rel_error(ours: dict, ref: dict, prefix: str = "") -> float:
    """The worst per-tensor error among tensors named ``prefix*`` (and inf if ``ours`` has a tensor ``ref`` lacks)."""
    if any(n.startswith(prefix) and n not in ref for n in ours):
        return float("inf")
    return max(tensor_errors(ours, ref, prefix).values(), default=0.0)


@dataclass
class StepRecord:
    """What one process ends a step with (gradients unscaled, float64 on the CPU)."""

    grads: dict[str, torch.Tensor]
    updates: dict[str, torch.Tensor]


@dataclass
class CheckRow:
    """One line of the check-grad table (the worst rank and step of the configuration)."""

    nproc: int
    tile_parallel: int
    mode: str
    encoder_grad: float
    aggregator_grad: float
    updates: float
    peak_mb: float
    ok: bool
    worst: str = ""  # kind:tensor@rank/step with the largest error relative to its tolerance
    error: str = ""
    scenario: str = ""

    @property
    def slide_groups(self) -> int:
        return self.nproc // self.tile_parallel


def compare_steps(steps: list[StepRecord], buffers: dict, ref_steps: list[StepRecord], ref_buffers: dict,
                  tol: tuple[float, float], noise: list[dict[str, dict[str, float]]] | None = None,
                  ) -> tuple[tuple[float, float, float], bool, str, list[str]]:
    """Compare one rank with the reference: ((encoder grad, aggregator grad, update) worst errors, ok, worst
    tensor as ``kind:name/step``, problems such as a gradient present on one side only)."""
    problems: list[str] = []
    worst = {"grad encoder.": 0.0, "grad aggregator.": 0.0, "update ": 0.0}
    ratio, worst_name = -1.0, ""
    for s, (ours, ref) in enumerate(zip(steps, ref_steps)):
        extra, missing = sorted(set(ours.grads) - set(ref.grads)), sorted(set(ref.grads) - set(ours.grads))
        if extra or missing:
            problems.append(f"step {s + 1}: grad presence differs: has {extra[:3]} the reference has not, lacks "
                            f"{missing[:3]}")
        for kind, a, b in (("grad", ours.grads, ref.grads), ("update", ours.updates, ref.updates)):
            step_noise = noise[s][kind] if noise else None
            for part, part_tol in (("encoder.", tol[0]), ("aggregator.", tol[1])):
                for name, err in tensor_errors(a, b, part, step_noise, part_tol).items():
                    key = "update " if kind == "update" else f"grad {part}"
                    worst[key] = max(worst[key], err)
                    r = err / part_tol if part_tol > 0 else (float("inf") if err > 0 else 0.0)
                    if r > ratio:
                        ratio, worst_name = r, f"{kind}:{name}/{s + 1}"
    if len(steps) != len(ref_steps):
        problems.append(f"{len(steps)} steps recorded, the reference has {len(ref_steps)}")
    bad_buffers = [n for n, e in tensor_errors(buffers, ref_buffers, "").items() if e > tol[0]]
    if bad_buffers or set(buffers) != set(ref_buffers):
        problems.append(f"buffers differ from the reference after the last step: {(bad_buffers or sorted(set(buffers) ^ set(ref_buffers)))[:3]}")
    errs = (worst["grad encoder."], worst["grad aggregator."], worst["update "])
    if problems:
        errs = (float("inf"),) * 3
    return errs, not problems and ratio <= 1.0, worst_name, problems
