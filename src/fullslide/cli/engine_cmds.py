"""Subcommands ``encoders`` (the foundation-model recipes) and ``check-grad`` (rerun the engine's equivalence
proof on your own hardware)."""

from __future__ import annotations

import argparse
import sys

from fullslide.proof import CHECK_MODES


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _str_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}, got {text!r}")
        return values

    return parse


def _yaml_mapping(text: str) -> dict:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not valid YAML: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{depth: 2}}', got {text!r}")
    return value


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Attach ``encoders``, ``plan`` and ``check-grad``."""
    p = sub.add_parser("encoders", help="list the foundation-model recipes (width, input, mpp, parameters, file)")
    p.set_defaults(func=cmd_encoders)

    p = sub.add_parser(
        "check-grad",
        help="prove every memory mode and process layout gives the single-process gradient",
        description="Compare, on every rank of every configuration, the gradient and the parameter update of every "
        "one of --steps SGD steps (momentum 0.9, weight decay; each step starts from the reference's weights and "
        "accumulates --micro-batches engine calls), which parameters have a gradient, the buffers, and that a step "
        "leaves parameters and RNG untouched, with a single-process, single-graph reference that shares no code "
        "with the engine; exits 1 if any per-tensor relative error exceeds the tolerance (float32 5e-5; "
        "bfloat16/float16 1e-2 for the encoder, 5e-4 for the aggregator, which runs in float32). The model carries "
        "tied, frozen and unused probe parameters and a drop-path branch. --suite checks every path users run "
        "(every aggregator, bf16, fp16 with a GradScaler, LoRA, last-N blocks, block checkpointing, layer decay, "
        "long peaked slides, resnet18). Launches the processes itself (gloo on CPU, NCCL on GPUs).",
    )
    p.add_argument("--suite", action="store_true",
                   help="run the scenarios of fullslide.proof.suite instead of one check (model options ignored)")
    p.add_argument("--encoder", default="tinycnn", help="encoder name: tinycnn, a timm name, or package.module:callable")
    p.add_argument("--weights", default=None, help="local encoder weights (.safetensors/.pth/.bin)")
    p.add_argument("--aggregator", default="gma",
                   help="gma, abmil, mean, max, transformer, chief, gigapath-slide or package.module:callable")
    p.add_argument("--aggregator-kwargs", type=_yaml_mapping, default={},
                   help="aggregator arguments as YAML, e.g. '{alibi: true}' (transformer with 2-D ALiBi over the "
                        "tiles' positions) or '{positional: true}' (gma)")
    p.add_argument("--tile-size", type=int, default=32, help="tile side in pixels")
    p.add_argument("--tiles", type=_int_list, default=[24, 17, 9, 30], help="K per slide, comma-separated, cycled")
    p.add_argument("--slides", type=int, default=4, help="slides per step")
    p.add_argument("--chunk", type=int, default=8, help="tiles encoded at once")
    p.add_argument("--agg-chunk", type=int, default=8,
                   help="tile-stage chunk of attention pooling (smaller than K, so the streamed softmax crosses chunks)")
    p.add_argument("--micro-batches", type=int, default=2, help="engine calls accumulated into each optimizer step")
    p.add_argument("--no-probes", action="store_true", help="check the bare model, without the probe parameters")
    p.add_argument("--encoder-kwargs", type=_yaml_mapping, default={},
                   help="encoder arguments as YAML, e.g. '{depth: 2, img_size: 32}' for a recipe at reduced size")
    p.add_argument("--trainable-blocks", type=int, default=None, help="train only the last N transformer blocks")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters (qkv, fc1) of this rank, dropout 0.1")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing inside the blocks")
    p.add_argument("--layer-decay", type=float, default=1.0,
                   help="layer-wise lr decay (< 1): the optimizer's per-layer learning rates are compared too")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--nproc", type=_int_list, default=[1, 2, 4], help="process counts to check, e.g. 1,2,4")
    p.add_argument("--mode", type=_str_list(CHECK_MODES), default=list(CHECK_MODES),
                   help="memory modes, comma-separated (auto-all/-half/-none: auto at a budget where every chunk "
                        "graph, about half, or none fits)")
    p.add_argument("--tile-parallel", type=_int_list, default=None,
                   help="tile-parallel degrees to check (default: every divisor of each process count)")
    p.add_argument("--steps", type=int, default=3,
                   help="SGD steps compared, each from the reference's weights of that step (default 3)")
    p.add_argument("--drop-rate", type=float, default=0.1, help="encoder dropout (exercises RNG replay)")
    p.add_argument("--drop-path-rate", type=float, default=0.1, help="encoder drop-path, for models that have it")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--tol", type=float, default=None,
                   help="max per-tensor relative error (default: 5e-5 float32; bfloat16/float16 1e-2 encoder, "
                        "5e-4 aggregator)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_check_grad)

    p = sub.add_parser("plan", help="predict memory per mode, the largest K that fits, and auto's compute (no training)",
                       description="Probe the config's encoder and aggregator (no weights read) and predict, per "
                       "memory mode, the peak a step adds, whether it fits the budget, the largest K that fits and "
                       "the compute relative to mode full.")
    p.add_argument("config", nargs="?", default=None, help="YAML config file (default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.tiles_per_slide=8192 (repeatable)")
    p.add_argument("--k", type=int, default=None, help="tiles per slide (default: train.tiles_per_slide)")
    p.add_argument("--slide-tiles", type=int, default=None, metavar="N",
                   help="train.context: cache: tiles of the largest slide, whose rows the aggregator reads (default 10000)")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="plan for a GPU of this memory, e.g. 80GB (probe in its default precision)")
    p.set_defaults(func=cmd_plan)


def cmd_check_grad(args: argparse.Namespace) -> int:
    import torch

    import signal

    from fullslide.proof.checkgrad import CheckSpec, run_checks, tolerances
    from fullslide.proof.compare import ZERO_FLOOR

    # a scheduler's (or timeout's) SIGTERM ends check-grad like Ctrl-C: its temporary folder is removed on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and max(args.nproc) > torch.cuda.device_count():
        print(f"fullslide check-grad: error: --nproc {max(args.nproc)} needs as many GPUs; "
              f"{torch.cuda.device_count()} visible (use --device cpu for gloo on CPU)", file=sys.stderr)
        return 2
    if args.suite:
        from fullslide.proof.suite import suite_specs

        specs = suite_specs(device)
    else:
        specs = [CheckSpec(
            encoder=args.encoder, aggregator=args.aggregator, weights=args.weights, tile_px=args.tile_size,
            tiles=args.tiles, slides=args.slides, chunk_tiles=args.chunk, aggregator_chunk_tiles=args.agg_chunk,
            dtype=args.dtype, drop_rate=args.drop_rate, drop_path_rate=args.drop_path_rate, steps=args.steps,
            micro_batches=args.micro_batches, probes=not args.no_probes, seed=args.seed, device=device,
            modes=args.mode, tile_parallel=args.tile_parallel, encoder_kwargs=args.encoder_kwargs,
            trainable_blocks=args.trainable_blocks, lora_rank=args.lora_rank, grad_checkpointing=args.grad_checkpointing,
            layer_decay=args.layer_decay, aggregator_kwargs=args.aggregator_kwargs,
        )]
    rows, refs = run_checks(specs, args.nproc, args.tol, progress=lambda m: print(m, file=sys.stderr))
    mem = "peak_cuda_MB" if device == "cuda" else "peak_rss_MB"
    for spec, ref in zip(specs, refs):
        enc_tol, agg_tol = tolerances(spec.dtype, args.tol if args.tol is not None else spec.tol)
        tol_text = f"{enc_tol:g}" if enc_tol == agg_tol else f"{enc_tol:g} encoder / {agg_tol:g} aggregator"
        print(("\n== " + spec.name + "\n") if spec.name else "", end="")
        print(f"{spec.describe()} tol={tol_text} (per tensor, zero floor {ZERO_FLOOR:g})")
        if ref.pooled_slides:
            print(f"streamed softmax: the highest attention score was beyond the first chunk in {ref.late_peaks}/"
                  f"{ref.pooled_slides} slide-calls; {ref.faint_chunks}/{ref.chunks} tile-stage chunks had every "
                  "weight below 1e-3")
        print(f"{'nproc':>5} {'tile_par':>8} {'groups':>6} {'mode':<10} {'enc_grad':>9} {'agg_grad':>9} "
              f"{'updates':>9} {mem:>12}  {'status':<6} worst kind:tensor/step@rank")
        print(f"{1:>5} {1:>8} {1:>6} {'reference':<10} {0:>9.1e} {0:>9.1e} {0:>9.1e} {ref.run.peak_mb:>12.1f}  ref")
        for r in (r for r in rows if r.scenario == spec.name):
            status = "ok" if r.ok else "FAIL"
            print(f"{r.nproc:>5} {r.tile_parallel:>8} {r.slide_groups:>6} {r.mode:<10} {r.encoder_grad:>9.1e} "
                  f"{r.aggregator_grad:>9.1e} {r.updates:>9.1e} {r.peak_mb:>12.1f}  {status:<6} {r.worst}"
                  + (f"  {r.error}" if r.error else ""))
    failed = [r for r in rows if not r.ok]
    where = f" over {len(specs)} scenarios" if len(specs) > 1 else ""
    if len(specs) == 1:
        enc_tol, agg_tol = tolerances(specs[0].dtype, args.tol)
        where = f" {enc_tol:g}" if enc_tol == agg_tol else f" {enc_tol:g} encoder / {agg_tol:g} aggregator"
    print(f"{len(rows) - len(failed)}/{len(rows)} configurations within tolerance{where} (every rank compared)")
    if failed and len(specs) > 1:
        print("failed: " + ", ".join(sorted({r.scenario for r in failed})))
    return 1 if failed else 0


def cmd_encoders(args: argparse.Namespace) -> int:
    """The recipe table, from the records alone (no torch, no timm: instant)."""
    from fullslide.models.recipes import RECIPES

    print(f"{'name':<15} {'width':>5} {'input':>5} {'mpp':>4} {'params':>7}  {'embedding':<22} "
          f"{'card transform':<38} {'file (layout)':<36} source")
    for r in RECIPES.values():
        files = "/".join(r.files) + ("" if r.layout == "timm" else f" ({r.layout})")
        size = f"{r.input_px}" + ("" if r.dynamic_size else "*")
        embedding = r.pooling if r.pooling != "module" else {
            "conch": "attentional pooler", "conch_v15": "attentional pooler", "resnet50_trunc": "layer3 average",
        }.get(r.builder, r.builder)
        print(f"{r.name:<15} {r.width:>5} {size:>5} {r.mpp:>4g} {r.params_m:>6.0f}M  {embedding:<22} "
              f"{r.transform():<38} {files:<36} {r.source}")
    print("Tiles of any size are resized on the compute device as the card's transform does (resize, centre crop, "
          "its kernel); * fixed input size.")
    print("Slide encoders (aggregator.name, fine-tuned with the tile encoder): chief - CHIEF's (768-d tile features, "
          "pretrained on CTransPath's; aggregator.weights: CHIEF_pretraining.pth, https://github.com/hms-dbmi/CHIEF); "
          "gigapath-slide - Prov-GigaPath's LongNet (1536-d GigaPath tile features; aggregator.weights: "
          "slide_encoder.pth, https://huggingface.co/prov-gigapath/prov-gigapath). "
          "Spatial aggregators: transformer {alibi: true}, gma {positional: true}.")
    print("Use: encoder: {name: uni, weights: /models/uni/pytorch_model.bin}. fullslide never downloads weights.")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory plan of a config."""
    from fullslide.train.config import load_config
    from fullslide.train.plan import plan_config

    config = load_config(args.config, args.overrides)
    print(plan_config(config, k=args.k, device_memory=args.device_memory, slide_tiles=args.slide_tiles).table())
    return 0
