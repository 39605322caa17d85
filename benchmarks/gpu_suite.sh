#!/usr/bin/env bash
# The GPU suite in one command: on one GPU, in about 10 minutes, writes gpu_suite/results.md (+ one JSON per part):
#   1. ViT-B/16 at 224 px, bf16: tiles/s and model FLOP utilisation per memory mode (K = 256, 1024);
#   2. the ViT-L (uni) and ViT-g (h-optimus-0) recipes, random weights, reduced K: tiles/s and MFU per mode;
#   3. the largest K per mode for ViT-B/16 (K doubled until out of memory);
#   4. recompute peak memory at K = 20,000 for ViT-B/16 (the paper spread ~20,000 tiles over ~34 GPUs);
#   5. the data path: loader + training against the engine alone with 8 loader workers (needs >= 9 CPU cores);
#   6. check-grad on the GPU (float32 and bfloat16);
#   7. `fullslide plan` for ViT-B/16 at K = 4096 on this GPU (allocator probe), to compare with part 1's peaks.
# Usage (from the repository root, the project installed): bash benchmarks/gpu_suite.sh [OUT_DIR]
# Each part has its own time limit, so one slow part cannot take the whole budget; a part that fails is noted.
# GPU_SUITE_BUDGET_S (default 900) caps the whole suite: each part gets min(its limit, what is left minus the
# time reserved for the parts after it), so a lease of a few minutes still reaches every part.
set -u
out=${1:-gpu_suite}
deadline=$(( $(date +%s) + ${GPU_SUITE_BUDGET_S:-900} ))
parts_left=7
mkdir -p "$out"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
run() {  # run NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    parts_left=$((parts_left - 1))
    local left=$(( deadline - $(date +%s) - 25 * parts_left ))  # keep >= 25 s for each later part
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then echo "== $name: skipped (suite budget spent)" | tee -a "$out/log.txt"; return; fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$out/log.txt"
    if timeout "$limit" "$@" > "$out/$name.txt" 2>&1; then echo "ok" >> "$out/log.txt"; else echo "FAILED or timed out (rc $?)" | tee -a "$out/log.txt"; fi
}
run vit_b_modes 120 $py benchmarks/bench_engine.py --device cuda --encoder vit_base_patch16_224 --tile-size 224 \
    --dtype bfloat16 --ks 256,1024 --chunk 128 --steps 3 --min-time 2 --json "$out/vit_b_modes.json"
run vit_l_g_recipes 150 bash -c "$py benchmarks/bench_engine.py --device cuda --encoder uni --tile-size 224 --dtype bfloat16 \
    --ks 256 --chunk 64 --steps 2 --min-time 1 --json $out/uni.json && $py benchmarks/bench_engine.py --device cuda \
    --encoder h-optimus-0 --tile-size 224 --dtype bfloat16 --ks 128 --chunk 32 --steps 2 --min-time 1 --json $out/hoptimus.json"
run vit_b_max_k 120 $py benchmarks/bench_engine.py --device cuda --encoder vit_base_patch16_224 --tile-size 224 \
    --dtype bfloat16 --ks 1024 --chunk 128 --steps 1 --min-time 0 --find-max-k --json "$out/vit_b_max_k.json"
run vit_b_k20000 120 $py benchmarks/bench_engine.py --device cuda --encoder vit_base_patch16_224 --tile-size 224 \
    --dtype bfloat16 --ks 20000 --modes recompute --chunk 256 --steps 1 --min-time 0 --json "$out/vit_b_k20000.json"
run data_path 120 $py benchmarks/bench_loader.py --device cuda --workers 8 --tile-px 224 --mpp 0.5 --k 1024 \
    --chunk 128 --epochs 2 --json "$out/data_path.json"
run plan_vit_b 60 fullslide plan --set encoder.name=vit_base_patch16_224 --set data.tile_px=224 \
    --set train.tiles_per_slide=4096 --set train.chunk_tiles=128 --set train.precision=bf16 --set train.device=cuda
run check_grad 90 bash -c "fullslide check-grad --device cuda --nproc 1 && fullslide check-grad --device cuda --nproc 1 --dtype bfloat16"
$py - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = ["# fullslide GPU suite", "", "GPU: " + (out / "gpu.txt").read_text().strip(), ""]
for name in ("vit_b_modes", "uni", "hoptimus", "vit_b_max_k", "vit_b_k20000"):
    f = out / f"{name}.json"
    if not f.exists():
        lines.append(f"- {name}: no result (see {name}.txt)")
        continue
    lines += [f"## {name}", "", "| encoder | K | mode | step s | tiles/s | MFU | peak MB |", "|---|---|---|---|---|---|---|"]
    for r in json.loads(f.read_text()):
        if r.get("oom") or "step_s" not in r:
            lines.append(f"| {r.get('encoder')} | {r.get('k')} | {r.get('mode')} | OOM or error | | | |")
            continue
        lines.append(f"| {r['encoder']} | {r['k']} | {r['mode']} | {r['step_s']:.3f} | {r['k'] / r['step_s']:.0f} | "
                     f"{r.get('mfu', float('nan')):.1%} | {r.get('peak_mb', float('nan')):.0f} |")
    lines.append("")
for name in ("vit_b_max_k", "data_path", "check_grad"):
    f = out / f"{name}.txt"
    lines += [f"## {name}", "", "```", f.read_text().strip()[-3000:] if f.exists() else "no output", "```", ""]
(out / "results.md").write_text("\n".join(lines))
print("\n".join(lines))
PY
