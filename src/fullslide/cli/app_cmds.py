"""Subcommands of the application: config, train, eval, predict, extract, heatmap, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _config_args(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("config", nargs=None if config_required else "?", type=Path, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable)")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Attach the application's subcommands."""
    p = sub.add_parser("config", help="print the default config (every key with its description)")
    _config_args(p)
    p.add_argument("--show", action="store_true", help="print the (resolved) config as YAML with descriptions")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("train", help="train end-to-end (or on frozen features) from a config")
    _config_args(p)
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cv", help="k-fold cross-validation: one run per fold and seed, a results table, ROC/PR curves",
                       description="Patient-level stratified folds; each fold and seed is a normal run folder under "
                       "OUT/runs (rerun the command to resume). Writes OUT/results.md, OUT/results.csv and OUT/curves/.")
    _config_args(p, config_required=True)
    p.add_argument("--folds", type=int, default=5, help="number of folds (5)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per fold (1)")
    p.add_argument("--seed-offset", type=int, default=0, help="first seed (0)")
    p.add_argument("--out", type=Path, required=True, help="cross-validation folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("eval", help="evaluate a trained run on a split: predictions.csv + metrics.json with 95%% CIs")
    p.add_argument("run_dir", type=Path, help="run folder made by `fullslide train`")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split (test)")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint folder")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/eval/SPLIT)")
    p.add_argument("--tile-parallel", type=int, default=1, metavar="T",
                   help="under torchrun: T ranks share each slide's tiles (one huge slide uses T GPUs)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="predict new slides with a trained run (tiles them if needed)")
    p.add_argument("run_dir", type=Path, help="run folder made by `fullslide train`")
    p.add_argument("inputs", nargs="+", metavar="SLIDES_OR_CSV", help="slide files, folders or a CSV with a path column")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint folder")
    p.add_argument("--mpp", type=float, default=None, help="mpp for slides without metadata")
    p.add_argument("--heatmaps", action="store_true", help="also draw heatmaps (PNG + GeoJSON) for every slide")
    p.add_argument("--tile-parallel", type=int, default=1, metavar="T",
                   help="under torchrun: T ranks share each slide's tiles (one huge slide uses T GPUs)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("extract", help="write per-slide tile features (HDF5) for the frozen-encoder baseline")
    _config_args(p)
    p.add_argument("--out", type=Path, default=None, help="features folder (default: data.features_dir)")
    p.add_argument("--tile-parallel", type=int, default=1, metavar="T",
                   help="under torchrun: T ranks share each slide's tiles (one huge slide uses T GPUs)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("heatmap", help="attention heatmaps (PNG over the thumbnail + QuPath GeoJSON)")
    p.add_argument("run_dir", type=Path, help="run folder made by `fullslide train`")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="slides of this split (test)")
    p.add_argument("--slides", nargs="*", default=None, help="slide ids (default: every slide of the split)")
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/heatmaps)")
    p.add_argument("--scale", default="rank", choices=("rank", "minmax", "raw"),
                   help="colours: percentile rank within the slide, the slide's min to max, or raw scores (rank)")
    p.add_argument("--alpha", type=float, default=0.45, help="opacity of the colours over the tissue (0.45)")
    p.add_argument("--smooth", type=float, default=0.0, help="Gaussian smoothing, sigma in tiles (0: tile squares)")
    p.add_argument("--cmap", default="coolwarm", help="matplotlib colour map (coolwarm)")
    p.add_argument("--top-k", type=int, default=8, help="tiles in the top-k / bottom-k gallery (8; 0: none)")
    p.add_argument("--annotations", type=Path, default=None,
                   help="outlines to draw: a GeoJSON (QuPath export) or lesion-mask PNG, or a folder of "
                        "{slide_id}.geojson|.json|.png")
    p.add_argument("--tile-parallel", type=int, default=1, metavar="T",
                   help="under torchrun: T ranks share each slide's tiles (one huge slide uses T GPUs)")
    p.set_defaults(func=cmd_heatmap)

    p = sub.add_parser("view", help="a local web viewer: pan and zoom slides with their scores (127.0.0.1 only)",
                       description="Serve the run's slides with the score overlay, tile scores on hover, annotations "
                       "and the predictions, on http://127.0.0.1:PORT (Ctrl-C stops). Missing scores are computed "
                       "first (as `fullslide heatmap`). Nothing is downloaded: the page ships inside the package.")
    p.add_argument("run_dir", type=Path, help="run folder made by `fullslide train`")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="slides of this split (test)")
    p.add_argument("--slides", nargs="*", default=None, help="slide ids (default: every slide of the split)")
    p.add_argument("--annotations", type=Path, default=None,
                   help="a GeoJSON / mask PNG, or a folder of {slide_id}.geojson|.json|.png, drawn as outlines")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (8765; 0: any free one)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.set_defaults(func=cmd_view)

    p = sub.add_parser("demo", help="the main job on its built-in default: synthetic cohort -> E2E vs frozen -> report")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (demo_out)")
    p.add_argument("--slides", type=int, default=None, help="slides in the synthetic cohort")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of both models")
    p.add_argument("--size", default=None, help="slide size WIDTHxHEIGHT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_config(args: argparse.Namespace) -> int:
    from fullslide.train.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from fullslide.errors import ConfigError
    from fullslide.experiments.cv import run_cv

    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    from fullslide.train.faults import sigterm_as_interrupt

    with sigterm_as_interrupt():  # SIGTERM between folds or during an evaluation: exit 143, resumable
        report = run_cv(args.config, args.out, folds=args.folds, seeds=args.seeds, seed_offset=args.seed_offset,
                        overrides=tuple(args.overrides), progress=not args.no_progress and sys.stderr.isatty())
    print(report)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from fullslide.train.config import load_config
    from fullslide.train.trainer import train

    progress = not args.no_progress and sys.stderr.isatty()
    if args.resume is not None:
        run = train(resume=args.resume, progress=progress, overrides=tuple(args.overrides))
    else:
        if args.config is None:
            print("fullslide train: error: give a CONFIG file or --resume RUN_DIR", file=sys.stderr)
            return 2
        run = train(load_config(args.config, args.overrides), progress=progress)
    print(f"run folder: {run}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fullslide.train.evaluate import evaluate_run

    out, metrics_line = evaluate_run(args.run_dir, split=args.split, checkpoint=args.checkpoint, out=args.out,
                                     progress=not args.no_progress and sys.stderr.isatty(),
                                     tile_parallel=args.tile_parallel)
    if metrics_line:  # rank 0 (under torchrun the others stay quiet)
        print(metrics_line)
        print(f"written: {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fullslide.train.evaluate import predict_new

    out, n_ok, n_failed = predict_new(args.run_dir, args.inputs, args.out, checkpoint=args.checkpoint, mpp=args.mpp,
                                      heatmaps=args.heatmaps, progress=not args.no_progress and sys.stderr.isatty(),
                                      tile_parallel=args.tile_parallel)
    print(f"{n_ok} slide(s) predicted, {n_failed} failed: {out}")
    return 1 if n_failed else 0


def cmd_extract(args: argparse.Namespace) -> int:
    from fullslide.train.config import load_config
    from fullslide.train.evaluate import extract

    out, n_ok, n_failed = extract(load_config(args.config, args.overrides), out=args.out,
                                  progress=not args.no_progress and sys.stderr.isatty(),
                                  tile_parallel=args.tile_parallel)
    print(f"{n_ok} slide(s) extracted, {n_failed} failed: {out}")
    return 1 if n_failed else 0


def cmd_heatmap(args: argparse.Namespace) -> int:
    from fullslide.train.evaluate import heatmaps_for_run

    from fullslide.viz.heatmap import HeatmapStyle

    style = HeatmapStyle(scale=args.scale, alpha=args.alpha, smooth=args.smooth, cmap=args.cmap, top_k=args.top_k)
    out, n = heatmaps_for_run(args.run_dir, split=args.split, slide_ids=args.slides, checkpoint=args.checkpoint,
                              out=args.out, tile_parallel=args.tile_parallel, style=style,
                              annotations=args.annotations)
    print(f"{n} heatmap(s) written to {out}")
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from fullslide.viz.viewer import prepare, serve

    data = prepare(args.run_dir, split=args.split, slide_ids=args.slides, annotations=args.annotations)
    server = serve(data, args.port)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    print(f"fullslide view: {len(data.slides)} slide(s) of {args.run_dir} at {url} (Ctrl-C stops)", flush=True)
    if args.open:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        data.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fullslide.viz.demo import run_demo

    report = run_demo(args.out, slides=args.slides, epochs=args.epochs, size=args.size, seed=args.seed,
                      progress=not args.no_progress and sys.stderr.isatty())
    print(f"report: {report}")
    return 0
