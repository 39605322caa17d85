"""Proof of the proof: plant each class of engine bug, one at a time, and show that both the engine tests and
``fullslide check-grad`` fail on it.

Each mutation is a text replacement in a copy of ``src/`` (the working tree is never touched). The copy goes
first on ``PYTHONPATH``, so the tests and check-grad's worker processes import the mutated package (checked
before each run). A mutation counts as caught by the tests when ``pytest -x`` on the engine tests fails, and by
check-grad when ``fullslide check-grad --nproc 1,2,4`` (its defaults) exits non-zero. The unmutated tree must
pass both first. The second group, ``defects``, puts back one defect fixed in issue 9 each: the tests must
catch them (they are not gradient bugs, so check-grad is not expected to).

    python benchmarks/prove_the_proof.py                 # every mutation (~25 min on 2 CPU cores)
    python benchmarks/prove_the_proof.py --only reduce_not_allreduce,no_rescale_sum
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE_TESTS = ["tests/test_engine_step.py", "tests/test_engine_distributed.py"]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str  # under src/fullslide/
    old: str
    new: str
    gradient_bug: bool = True  # check-grad must catch it too


_LATE_ZERO = (
    "        # Phase 5: sum over the world.\n",
    "        if ctx.tp_rank != 0:\n            for q in agg_params:\n                q.grad = None\n"
    "        # Phase 5: sum over the world.\n",
)

MUTATIONS = [
    Mutation("no_rescale_sum", "online softmax: running sum not rescaled when the max moves to a later chunk",
             "engine/aggregate.py", "total = total * rescale + e.sum()", "total = total + e.sum()"),
    Mutation("seed_ignores_slide", "per-chunk seeds ignore the slide (every slide draws the same dropout masks)",
             "engine/rng.py", 'f"{step_seed}/{slide_index}/{chunk_index}"', 'f"{step_seed}/0/{chunk_index}"'),
    Mutation("prior_grad_dropped", "a pre-existing .grad is dropped instead of accumulated",
             "engine/step.py", "p.grad = g if p.grad is None else p.grad.add_(g)", "p.grad = g if p.grad is None else p.grad"),
    Mutation("prior_grad_reduced", "a pre-existing .grad is summed into the world reduction (x world size)",
             "engine/step.py", "stash = _stash_grads(params)", "stash = {}"),
    Mutation("zero_attention_bias_grad", "the attention MLP's bias gradient is zeroed",
             "engine/step.py", "        # Phase 5: sum over the world.\n",
             "        for _n, _q in aggregator.named_parameters():\n"
             "            if _n.endswith('attn_v.bias') and _q.grad is not None:\n"
             "                _q.grad.zero_()\n        # Phase 5: sum over the world.\n"),
    Mutation("reduce_not_allreduce", "gradients reduced to rank 0 only (reduce instead of all_reduce)",
             "engine/collectives.py", "dist.all_reduce(flat, op=dist.ReduceOp.SUM)",
             "dist.reduce(flat, dst=0, op=dist.ReduceOp.SUM)"),
    Mutation("average_not_sum", "gradients averaged over the world instead of summed",
             "engine/collectives.py", "    anyone = (flat[-len(bucket):] > 0).tolist()",
             "    flat /= dist.get_world_size()\n    anyone = (flat[-len(bucket):] > 0).tolist()"),
    Mutation("pass2_wrong_seed", "recompute pass 2 replays a chunk under another seed (other dropout masks)",
             "engine/recompute.py", "tiles[start:stop], derive_seed(step_seed, slide_index, chunk_index), device",
             "tiles[start:stop], derive_seed(step_seed + 1, slide_index, chunk_index), device"),
    Mutation("skipped_chunk", "recompute pass 2 skips the last chunk of each slide",
             "engine/recompute.py", "for chunk_index, start, stop in enc_pass.chunks:",
             "for chunk_index, start, stop in enc_pass.chunks[:-1]:"),
    Mutation("wrong_grad_slice", "each rank backpropagates the first rows of dLoss/dFeatures, not its own share",
             "engine/step.py", "f.grad[start:stop]", "f.grad[: stop - start]"),
    Mutation("agg_grads_twice", "replicated aggregator gradients counted once per tile-parallel rank",
             "engine/step.py", "        if ctx.tp_rank != 0:\n            for q in agg_params:",
             "        if False:\n            for q in agg_params:"),
    Mutation("logits_every_rank", "every rank of a group writes the slide logits (summed tile_parallel times)",
             "engine/step.py", "if ctx.tp_rank == 0:  # one writer per slide", "if True:  # one writer per slide"),
    Mutation("shared_grad_dropped", "replicated aggregator grads cleared after the encoder backward (tied params "
             "lose their encoder part on tp_rank > 0)", "engine/step.py",
             "        if ctx.tp_rank != 0:\n            for q in agg_params:\n                q.grad = None\n"
             "        # Phase 4", "        # Phase 4"),
    Mutation("unused_grad_zeros", "a parameter no rank uses gets a gradient of zeros (None in one process)",
             "engine/collectives.py", "if not has:  # no rank had a gradient", "if False:  # no rank had a gradient"),
    Mutation("stream_missing_shift", "streamed attention backward drops the softmax centring term (z . dz)",
             "engine/aggregate.py", "(h.detach().float() @ dz - z_dot)", "(h.detach().float() @ dz)"),
    Mutation("gather_rank_order", "gathered features assembled in reverse rank order",
             "engine/step.py", "for r, part in enumerate(parts):", "for r, part in reversed(list(enumerate(parts))):"),
    Mutation("checkpoint_unseeded", "checkpoint mode recomputes a chunk without its seed (other dropout masks)",
             "engine/recompute.py", "                _run_chunk, encoder, tiles[start:stop], seed, device, amp_dtype,",
             "                _run_chunk, encoder, tiles[start:stop], seed + 1, device, amp_dtype,"),
    # Defects of issue 9, put back: caught by the tests (not gradient bugs, so not check-grad's business).
    Mutation("defect_mean_attention", "mean pooling reports uniform weights in recompute, tile logits in full",
             "engine/aggregate.py", "return self.tile_scores if self.tile_scores is not None else torch.exp(",
             "return torch.exp(", gradient_bug=False),
    Mutation("defect_caller_features", "the engine sets requires_grad (and .grad) on the caller's features",
             "engine/step.py", "feats = [f.detach().requires_grad_() for f", "feats = [f.requires_grad_() for f",
             gradient_bug=False),
    Mutation("defect_tokens_over_channels", "token outputs [N, T, D] averaged over D instead of over tokens",
             "models/encoders.py", "out = out.mean(1)  # [B, T, D]", "out = out.mean(2)  # [B, T, D]",
             gradient_bug=False),
]
# shared_grad_dropped also needs the late clearing put back (the original defect).
_LATE = {"shared_grad_dropped": _LATE_ZERO}


def _plant(src: Path, m: Mutation) -> None:
    path = src / "fullslide" / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"{m.name}: expected exactly one occurrence of {m.old!r} in {m.path}, found {text.count(m.old)}")
    text = text.replace(m.old, m.new)
    if m.name in _LATE:
        old, new = _LATE[m.name]
        if text.count(old) != 1:
            raise SystemExit(f"{m.name}: cannot place the late clearing in {m.path}")
        text = text.replace(old, new)
    path.write_text(text)


def _env(src: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), str(ROOT / "tests")]), PYTHONDONTWRITEBYTECODE="1")
    found = subprocess.run([sys.executable, "-c", "import fullslide; print(fullslide.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not found.startswith(str(src)):
        raise SystemExit(f"the mutated copy is not the one imported ({found}); is fullslide installed non-editable?")
    return env


def _run(cmd: list[str], env: dict[str, str], timeout_s: float) -> tuple[bool, str]:
    """(failed, last line of output)."""
    try:
        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return True, f"timed out after {timeout_s:.0f} s"
    lines = [ln for ln in (p.stdout + p.stderr).strip().splitlines() if ln.strip()]
    return p.returncode != 0, lines[-1] if lines else ""


def check(m: Mutation | None, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="fullslide-mutant-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        if m is not None:
            _plant(src, m)
        env = _env(src)
        t0 = time.monotonic()
        tests_failed, tests_line = _run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *ENGINE_TESTS],
                                        env, timeout_s)
        cg_failed, cg_line = (None, "")
        if m is None or m.gradient_bug:
            cg_failed, cg_line = _run([sys.executable, "-m", "fullslide.cli", "check-grad", "--nproc", "1,2,4"], env, timeout_s)
        return {"tests": tests_failed, "tests_line": tests_line, "check_grad": cg_failed, "check_grad_line": cg_line,
                "seconds": time.monotonic() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated mutation names")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per command")
    ap.add_argument("--skip-baseline", action="store_true", help="do not first check that the unmutated tree passes")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    if not args.skip_baseline:
        base = check(None, args.timeout)
        print(f"baseline (no mutation): tests {'FAIL' if base['tests'] else 'pass'}, "
              f"check-grad {'FAIL' if base['check_grad'] else 'pass'} ({base['seconds']:.0f} s)", flush=True)
        if base["tests"] or base["check_grad"]:
            print(base["tests_line"], base["check_grad_line"], sep="\n")
            return 1
    print("| planted bug | what it does | tests | check-grad |")
    print("|---|---|---|---|")
    missed = 0
    for m in chosen:
        r = check(m, args.timeout)
        tests = "caught" if r["tests"] else "MISSED"
        cg = "n/a (not a gradient)" if r["check_grad"] is None else ("caught" if r["check_grad"] else "MISSED")
        missed += (not r["tests"]) + (r["check_grad"] is False)
        print(f"| `{m.name}` | {m.what} | {tests} | {cg} |", flush=True)
    print(f"\n{len(chosen)} planted bugs, {missed} misses")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
