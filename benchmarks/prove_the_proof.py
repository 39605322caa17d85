"""Proof of the proof: plant each class of engine bug, one at a time, and show that both the engine tests and
``fullslide check-grad`` fail on it.

Each mutation is a text replacement in a copy of ``src/`` (the working tree is never touched). The copy goes
first on ``PYTHONPATH``, so the tests and check-grad's worker processes import the mutated package (checked
before each run). A mutation counts as caught by the tests when ``pytest -x`` on the engine tests fails, and by
check-grad when ``fullslide check-grad --suite`` (as the README tells users to run it) exits non-zero; with
``--quick``, ``fullslide check-grad --nproc 1,2,4`` (the suite's first scenario alone). The unmutated tree must
pass both first. The second group, ``defects``, puts back one defect fixed in issue 9 each: the tests must
catch them (they are not gradient bugs, so check-grad is not expected to).

    python benchmarks/prove_the_proof.py                 # every mutation (~2.5 h on 2 CPU cores)
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
ENGINE_TESTS = ["tests/test_engine_step.py", "tests/test_context.py", "tests/test_engine_controls.py",
                "tests/test_engine_distributed.py"]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str  # under src/fullslide/
    old: str
    new: str
    gradient_bug: bool = True  # check-grad must catch it too
    also: tuple[tuple[str, str], ...] = ()  # further replacements in the same file


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
             "engine/recompute.py", "for chunk_index, start, stop in enc_pass.chunks[kept:]:",
             "for chunk_index, start, stop in enc_pass.chunks[kept:-1]:"),
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
    # Issue 16: bugs the default check-grad and the engine tests used to miss.
    Mutation("agg_in_autocast", "the aggregator and pooling run inside the encoder's autocast (bf16/fp16)",
             "engine/step.py", "        agg_kw = dict(aggregator_chunk_tiles=aggregator_chunk_tiles, step_seed=step_seed, device=device)\n",
             "        agg_kw = dict(aggregator_chunk_tiles=aggregator_chunk_tiles, step_seed=step_seed, device=device)\n"
             "        _ac = recompute.autocast_ctx(device, amp_dtype)\n        _ac.__enter__()\n",
             also=(("        n_classes = outs[0].logits.numel()", "        _ac.__exit__(None, None, None)\n"
                    "        n_classes = outs[0].logits.numel()"),)),
    Mutation("scale_encoder_only", "the loss scale reaches only the gradient entering the encoder (aggregator "
             "gradients unscaled, then divided by the scale)", "engine/step.py",
             "scaled = grad_scaler.scale(loss) if grad_scaler is not None else loss", "scaled = loss",
             also=(("f.grad[start:stop], mode=mode",
                    "f.grad[start:stop] * (grad_scaler.get_scale() if grad_scaler is not None else 1.0), mode=mode"),)),
    Mutation("whole_call_block_minus2", "the whole-slide aggregator call (transformer, max) seeded as block -2, not -1",
             "engine/aggregate.py", "        with seeded(derive_seed(step_seed, slide_index, AGGREGATOR_CHUNK), device):\n"
             "            return aggregator(feats)", "        with seeded(derive_seed(step_seed, slide_index, -2), device):\n"
             "            return aggregator(feats)"),
    Mutation("lora_private_generator", "LoRA dropout draws from a private generator (not replayed by the chunk seed)",
             "models/finetune.py", "update = self.dropout(x) @",
             "update = ((x * torch.empty_like(x).bernoulli_(1 - self.dropout.p, generator=_PRIVATE) / (1 - self.dropout.p))"
             " if self.training and self.dropout.p > 0 else x) @",
             also=(("class LoRALinear(nn.Module):", "_PRIVATE = torch.Generator().manual_seed(0)\n\n\nclass LoRALinear(nn.Module):"),)),
    Mutation("block_ckpt_no_rng", "per-block checkpointing without preserve_rng_state (recomputed blocks redraw "
             "drop-path)", "models/finetune.py", "            module.set_grad_checkpointing(enabled)\n",
             "            for _b in module.blocks:\n"
             "                _b.forward = (lambda f: lambda *a, **k: torch.utils.checkpoint.checkpoint(\n"
             "                    f, *a, use_reentrant=False, preserve_rng_state=False, **k))(_b.forward)\n"),
    Mutation("skip_faint_chunks", "the streamed backward skips tile-stage chunks whose weights are all below 1e-3",
             "engine/aggregate.py", "        w = torch.exp(pool.scores[start:stop] - pool.lse)  # [k] softmax weights, constants\n",
             "        w = torch.exp(pool.scores[start:stop] - pool.lse)  # [k] softmax weights, constants\n"
             "        if float(w.max()) < 1e-3:\n            continue\n"),
    Mutation("probe_leaks_grad", "auto's probe backpropagates its forward into .grad", "engine/budget.py",
             "        width = int(out.shape[-1]) if isinstance(out, torch.Tensor) else 0\n",
             "        if isinstance(out, torch.Tensor) and out.requires_grad:\n            out.float().sum().backward()\n"
             "        width = int(out.shape[-1]) if isinstance(out, torch.Tensor) else 0\n"),
    Mutation("layer_decay_one_digit", "layer decay matches one-digit block numbers only (blocks 10, 11 at lr x1)",
             "models/finetune.py", '_BLOCK = re.compile(r"(^|\\.)blocks\\.(\\d+)\\.")',
             '_BLOCK = re.compile(r"(^|\\.)blocks\\.(\\d)\\.")'),
    Mutation("last_blocks_norm_frozen", "trainable_blocks leaves the final norm frozen", "models/finetune.py",
             "p.requires_grad_(layer_id(name, n_blocks) > n_blocks - n)",
             "p.requires_grad_(n_blocks - n < layer_id(name, n_blocks) <= n_blocks)"),
    Mutation("draws_ignore_epoch", "each slide's tile draw ignores the epoch (same tiles every epoch)",
             "data/sampler.py", "np.random.default_rng([self.seed, epoch, 1, i])", "np.random.default_rng([self.seed, 0, 1, i])",
             gradient_bug=False),
    Mutation("probe_no_buffer_restore", "auto's probe does not restore the buffers its forward changed",
             "engine/budget.py", "            b.copy_(buffers[name])", "            pass", gradient_bug=False),
    Mutation("budget_per_slide", "the kept-chunk budget is given to every slide of a step instead of shared",
             "engine/step.py", "        left -= n\n", "", gradient_bug=False),
    # Issue 18: whole-slide context.
    Mutation("context_before_fresh", "context rows placed before the fresh ones: cached rows' gradient reaches the "
             "encoder, fresh rows' does not", "engine/step.py",
             "feats = [(torch.cat([f, b.context.to(device, f.dtype)]) if b.n_context else f)",
             "feats = [(torch.cat([b.context.to(device, f.dtype), f]) if b.n_context else f)"),
    Mutation("cache_rows_misplaced", "fresh rows written back to the wrong cache positions", "train/context.py",
             "    out[torch.as_tensor(index[pick], dtype=torch.long)] =",
             "    out[torch.as_tensor(np.sort(pick), dtype=torch.long)] =", gradient_bug=False),
    Mutation("context_keeps_sampled", "the context keeps the cached rows of the sampled tiles (those tiles twice)",
             "train/context.py", "    keep[torch.as_tensor(sampled, dtype=torch.long)] = False\n", "", gradient_bug=False),
    # Issue 20: aggregators that see where the tiles lie (spatial aggregators, slide encoders).
    Mutation("whole_slide_positions_reversed", "a whole-slide aggregator (ALiBi transformer, Prov-GigaPath's slide "
             "encoder) gets its tiles' positions in reverse order", "engine/aggregate.py",
             "return run_aggregator(aggregator, feats, positions)",
             "return run_aggregator(aggregator, feats, None if positions is None else positions.flip(0))"),
    Mutation("tile_stage_positions_rolled", "each tile-stage chunk of a streamed spatial aggregator gets the "
             "positions of the row before", "engine/aggregate.py",
             "    return None if positions is None else positions[start:stop]",
             "    return None if positions is None else positions.roll(1, 0)[start:stop]"),
    # Defects of issue 9, put back: caught by the tests (not gradient bugs, so not check-grad's business).
    Mutation("defect_mean_attention", "mean pooling reports uniform weights in recompute, tile logits in full",
             "engine/aggregate.py", "return self.tile_scores if self.tile_scores is not None else torch.exp(",
             "return torch.exp(", gradient_bug=False),
    Mutation("defect_caller_features", "the engine sets requires_grad (and .grad) on the caller's features",
             "engine/step.py", "if b.n_context else f).detach().requires_grad_()", "if b.n_context else f).requires_grad_()",
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
    for old, new in m.also:
        if text.count(old) != 1:
            raise SystemExit(f"{m.name}: expected exactly one occurrence of {old!r} in {m.path}, found {text.count(old)}")
        text = text.replace(old, new)
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


def check(m: Mutation | None, timeout_s: float, check_grad_args: list[str]) -> dict:
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
            cg_failed, cg_line = _run([sys.executable, "-m", "fullslide.cli", "check-grad", *check_grad_args], env, timeout_s)
        return {"tests": tests_failed, "tests_line": tests_line, "check_grad": cg_failed, "check_grad_line": cg_line,
                "seconds": time.monotonic() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated mutation names")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per command")
    ap.add_argument("--quick", action="store_true",
                    help="check-grad --nproc 1,2,4 (the suite's default scenario) instead of check-grad --suite")
    ap.add_argument("--skip-baseline", action="store_true", help="do not first check that the unmutated tree passes")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    cg_args = ["--nproc", "1,2,4"] if args.quick else ["--suite"]
    if not args.skip_baseline:
        base = check(None, args.timeout, cg_args)
        print(f"baseline (no mutation): tests {'FAIL' if base['tests'] else 'pass'}, "
              f"check-grad {'FAIL' if base['check_grad'] else 'pass'} ({base['seconds']:.0f} s)", flush=True)
        if base["tests"] or base["check_grad"]:
            print(base["tests_line"], base["check_grad_line"], sep="\n")
            return 1
    print("| planted bug | what it does | tests | check-grad |")
    print("|---|---|---|---|")
    missed = 0
    for m in chosen:
        r = check(m, args.timeout, cg_args)
        tests = "caught" if r["tests"] else "MISSED"
        cg = "n/a (not a gradient)" if r["check_grad"] is None else ("caught" if r["check_grad"] else "MISSED")
        missed += (not r["tests"]) + (r["check_grad"] is False)
        print(f"| `{m.name}` | {m.what} | {tests} | {cg} |", flush=True)
    print(f"\n{len(chosen)} planted bugs, {missed} misses")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
