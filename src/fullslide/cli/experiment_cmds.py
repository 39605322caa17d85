"""Subcommands that reproduce the paper's findings: ``pretrain`` and ``experiment {k-sweep,e2e-vs-frozen}``, and
the stain-shift check (``experiment stain-shift``)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from fullslide.cli.engine_cmds import _yaml_mapping
from fullslide.errors import ConfigError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Attach ``pretrain`` and ``experiment``."""
    p = sub.add_parser("pretrain", help="self-supervised (SimCLR) pretraining of a tile encoder on tiled slides",
                       description="Pretrain an encoder without labels on the tiles of every slide tiled into "
                       "COORDS_DIR (`fullslide tile`); writes the backbone's weights as safetensors for "
                       "encoder.weights.")
    p.add_argument("coords_dir", type=Path, help="folder made by `fullslide tile` (patches/*.h5)")
    p.add_argument("--out", type=Path, required=True, help="weights file to write (.safetensors)")
    p.add_argument("--encoder", default="tinycnn", help="encoder name (tinycnn, a timm name, ...)")
    p.add_argument("--encoder-kwargs", type=_yaml_mapping, default={},
                   help="encoder factory arguments, e.g. '{img_size: 32, patch_size: 8}' for a small ViT (give the "
                        "same ones to encoder.kwargs when training)")
    p.add_argument("--epochs", type=_positive_int, default=8, help="epochs (8)")
    p.add_argument("--tiles-per-slide", type=_positive_int, default=256, help="tiles sampled once per slide (256)")
    p.add_argument("--batch", type=_positive_int, default=256, help="tiles per batch; 2x views (256)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine decay (2e-3)")
    p.add_argument("--temperature", type=float, default=0.2, help="contrastive temperature (0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, views and initialisation (0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("experiment", help="reproduce the paper's findings: k-sweep, e2e-vs-frozen; stain-shift "
                                          "(EXPERIMENTS.md)")
    which = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name, help_text in (("k-sweep", "more tiles per slide (K) -> lower training loss, higher AUC?"),
                            ("e2e-vs-frozen", "end-to-end fine-tuning vs the same pretrained encoder frozen"),
                            ("stain-shift", "train on sites A-B, test on site C: no stain handling, HED jitter, "
                                            "Macenko, Reinhard")):
        q = which.add_parser(name, help=help_text)
        q.add_argument("--out", type=Path, required=True, help="experiment folder (rerun the command to resume)")
        if name == "k-sweep":
            q.add_argument("--ks", default="8,32,128,512,all", help="values of K (8,32,128,512,all)")
            q.add_argument("--context", default="none",
                           help="arms: none, cache (train.context: cache: the aggregator reads every tile), or "
                                "none,cache (none)")
        elif name == "stain-shift":
            q.add_argument("--arms", default=",".join(("none", "hed", "macenko", "reinhard")),
                           help="arms among none, hed, macenko, reinhard (all four)")
            q.add_argument("--signal", choices=("diffuse", "focal"), default=None,
                           help="cohort signal (diffuse: more nuclei and a bluer tint, partly a colour cue; focal: "
                                "lesions of denser, larger nuclei) (diffuse)")
            q.add_argument("--site-shift", type=float, default=None,
                           help="how far sites B and C stain from site A (0.35; see `fullslide synth --site-shift`)")
        else:
            q.add_argument("--signals", default="focal,diffuse", help="cohort signals (focal,diffuse)")
            q.add_argument("--situations", default="out-of-domain,in-domain",
                           help="pretrained encoders: out-of-domain (never saw a lesion), in-domain (did) "
                                "(out-of-domain,in-domain)")
            q.add_argument("--archs", default="cnn",
                           help="encoders: cnn (tinycnn: frozen, e2e, e2e-cache), vit (a small ViT: frozen, e2e, "
                                "e2e-lastN, e2e-lora) or cnn,vit (cnn)")
            q.add_argument("--lesion-fraction", type=float, default=None,
                           help="focal: share of a positive slide's tissue in lesions (0.02; 0.01: sparser, harder)")
            q.add_argument("--tune-lr", default=None, metavar="LR,LR,...",
                           help="choose each arm's learning rate among these on validation loss first (seed 100, "
                                "the first signal); default: the rates chosen for EXPERIMENTS.md")
        q.add_argument("--seeds", type=_positive_int, default=3, help="number of seeds (3)")
        q.add_argument("--seed-offset", type=int, default=0, help="first seed (0)")
        q.add_argument("--quick", action="store_true", help="a small plumbing check (< 3 min on 2 cores)")
        q.set_defaults(func=cmd_experiment)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fullslide.train.pretrain import PretrainSettings, pretrain

    settings = PretrainSettings(encoder=args.encoder, encoder_kwargs=args.encoder_kwargs, epochs=args.epochs, tiles_per_slide=args.tiles_per_slide,
                                batch=args.batch, lr=args.lr, temperature=args.temperature, seed=args.seed)
    record = pretrain(args.coords_dir, args.out, settings, device=args.device, progress=not args.no_progress)
    print(f"{args.out}: {record['tiles']} tiles of {record['slides']} slides, contrastive loss "
          f"{record['loss_by_epoch'][0]:.3f} -> {record['loss_by_epoch'][-1]:.3f} in {record['seconds']:.0f} s")
    return 0


def _choices(flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or len(set(values)) != len(values) or any(v not in allowed for v in values):
        raise ConfigError(f"{flag} {text!r}: give distinct values among {', '.join(allowed)}")
    return values


def cmd_experiment(args: argparse.Namespace) -> int:
    from fullslide.train.faults import sigterm_as_interrupt

    with sigterm_as_interrupt():  # SIGTERM between runs or during an evaluation: exit 143, resumable
        return _run_experiment(args)


def _run_experiment(args: argparse.Namespace) -> int:
    if args.experiment == "k-sweep":
        from fullslide.experiments import k_sweep

        report = k_sweep.run(args.out, ks=k_sweep.parse_ks(args.ks), seeds=args.seeds, seed_offset=args.seed_offset,
                             quick=args.quick, contexts=tuple(k_sweep.parse_contexts(args.context)))
    elif args.experiment == "stain-shift":
        from fullslide.experiments import stain_shift

        settings = stain_shift.Settings.quick() if args.quick else stain_shift.Settings()
        if args.site_shift is not None:
            settings = dataclasses.replace(settings, site_shift=args.site_shift)
        if args.signal is not None:
            settings = dataclasses.replace(settings, signal=args.signal)
        report = stain_shift.run(args.out, seeds=args.seeds, seed_offset=args.seed_offset, quick=args.quick,
                                 arms=tuple(_choices("--arms", args.arms, stain_shift.ARMS)), settings=settings)
    else:
        from fullslide.experiments import e2e_vs_frozen

        signals = [s.strip() for s in args.signals.split(",") if s.strip()]
        bad = [s for s in signals if s not in ("focal", "diffuse")]
        if bad or not signals or len(set(signals)) != len(signals):
            raise ConfigError(f"--signals {args.signals!r}: give distinct values among focal, diffuse")
        situations = _choices("--situations", args.situations, e2e_vs_frozen.SITUATIONS)
        archs = _choices("--archs", args.archs, e2e_vs_frozen.ARCHS)
        grid = None
        if args.tune_lr:
            try:
                grid = [float(v) for v in args.tune_lr.split(",") if v.strip()]
            except ValueError:
                raise ConfigError(f"--tune-lr {args.tune_lr!r}: give learning rates separated by commas") from None
            if not grid or any(not v > 0 for v in grid):
                raise ConfigError(f"--tune-lr {args.tune_lr!r}: give positive learning rates")
        base = e2e_vs_frozen.Settings.quick() if args.quick else e2e_vs_frozen.Settings()
        settings = dataclasses.replace(base, situations=tuple(situations), archs=tuple(archs))
        if args.lesion_fraction is not None:
            if not 0 < args.lesion_fraction <= 0.5:
                raise ConfigError(f"--lesion-fraction must be in (0, 0.5], got {args.lesion_fraction}")
            settings = dataclasses.replace(settings, lesion_fraction=args.lesion_fraction)
        report = e2e_vs_frozen.run(args.out, signals=signals, seeds=args.seeds, seed_offset=args.seed_offset,
                                   quick=args.quick, settings=settings, tune_grid=grid)
    print(report)
    return 0
