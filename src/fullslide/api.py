"""The Python API: ``import fullslide as fs``.

Every job of the command line is a function here, with the same behaviour (the CLI calls the same code)::

    import fullslide as fs

    cohort = fs.synth("data/synth", slides=24, size=1024)          # or your own CSV: slide_id, path, label, ...
    fs.tile(cohort, "data/tiles", target_mpp=1.0, tile_px=32)
    run = fs.train({"run_dir": "runs/demo", "data": {"cohort": str(cohort), "coords_dir": "data/tiles",
                                                      "target_mpp": 1.0, "tile_px": 32},
                    "encoder": {"name": "tinycnn"}, "train": {"epochs": 3, "device": "cpu"}})
    metrics = run.evaluate("test")                                   # {"auc": {"value", "ci_low", "ci_high"}, ...}
    predictions = run.predictions("test")                            # list of dicts (predictions.csv)
    run.heatmaps("test")                                             # PNG + QuPath GeoJSON per slide
    run.predict(["new_slide.svs"], out="preds")                      # tiles new slides, predicts them

A ``config`` argument is a YAML path, a dict (sections as in ``fullslide config --show``) or a
:class:`~fullslide.train.config.Config`; ``overrides`` are ``"section.key=value"`` strings as ``--set`` takes.
Lower-level pieces stay where they live: ``fs.engine.step`` (the exact step), ``fs.models.create_encoder``,
``fs.slides.open_slide``. Importing ``fullslide`` stays cheap: torch and the slide libraries load on first use.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

ConfigLike = Union[str, Path, Mapping[str, Any], Any]


def load_config(config: ConfigLike = None, overrides: Sequence[str] = ()) -> Any:
    """A validated :class:`~fullslide.train.config.Config` from a YAML path, a dict, a Config (copied, then the
    overrides applied) or ``None`` (the defaults)."""
    from fullslide.train.config import Config, config_from_dict
    from fullslide.train.config import load_config as _load

    if isinstance(config, Config):
        return config_from_dict(dataclasses.asdict(config), tuple(overrides))
    if isinstance(config, Mapping):
        return config_from_dict(dict(config), tuple(overrides))
    return _load(config, tuple(overrides))


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained (or training) run folder: its config, checkpoints, metrics and what can be done with it."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if not (self.path / "config.yaml").is_file():
            from fullslide.errors import ConfigError

            raise ConfigError(f"{self.path}: not a run folder (no config.yaml)")

    @property
    def config(self) -> Any:
        """The run's resolved :class:`~fullslide.train.config.Config` (paths as saved in the folder)."""
        from fullslide.train.config import load_run_config

        return load_run_config(self.path)

    @property
    def info(self) -> dict[str, Any]:
        """``run.json``: task, classes, excluded slides, best epoch, ..."""
        return json.loads((self.path / "run.json").read_text())

    @property
    def history(self) -> list[dict[str, Any]]:
        """``metrics.csv`` as one dict per epoch (numbers as floats)."""
        from fullslide.viz.report import read_metrics_csv

        return read_metrics_csv(self.path / "metrics.csv")

    def evaluate(self, split: str = "test", *, checkpoint: str = "best", out: str | Path | None = None,
                 progress: bool = False) -> dict[str, Any]:
        """Predict every slide of ``split`` on all its tiles and score it (``eval``); returns the metrics, each
        ``{"value", "ci_low", "ci_high"}`` (bootstrap 95% CI). Files: ``RUN/eval/SPLIT/`` or ``out``."""
        from fullslide.train.evaluate import evaluate_run

        folder, _ = evaluate_run(self.path, split=split, checkpoint=checkpoint,
                                 out=Path(out) if out is not None else None, progress=progress)
        return json.loads((folder / "metrics.json").read_text())["metrics"]

    def predictions(self, split: str = "test") -> list[dict[str, str]]:
        """The rows of ``predictions.csv`` written by :meth:`evaluate` for ``split`` (evaluated first if needed)."""
        path = self.path / "eval" / split / "predictions.csv"
        if not path.exists():
            self.evaluate(split)
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def predict(self, slides: Iterable[str | Path], out: str | Path, *, checkpoint: str = "best",
                mpp: float | None = None, heatmaps: bool = False, progress: bool = False) -> list[dict[str, str]]:
        """Tile (if needed) and predict new slides (paths, folders or a CSV); returns the rows of ``out/predictions.csv``.
        A slide that cannot be read is a row with its error, never an exception."""
        from fullslide.train.evaluate import predict_new

        csv_path, _, _ = predict_new(self.path, [str(s) for s in slides], Path(out), checkpoint=checkpoint, mpp=mpp,
                                     heatmaps=heatmaps, progress=progress)
        with open(csv_path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def heatmaps(self, split: str = "test", *, slide_ids: Sequence[str] | None = None, checkpoint: str = "best",
                 out: str | Path | None = None) -> list[Path]:
        """Attention heatmaps (PNG over the thumbnail + QuPath GeoJSON, a top/bottom tile gallery beside each) of
        ``split``'s slides or ``slide_ids``; returns the heatmap PNGs (one per slide and score, galleries left out)."""
        from fullslide.train.evaluate import heatmaps_for_run

        folder, _ = heatmaps_for_run(self.path, split=split, slide_ids=slide_ids, checkpoint=checkpoint,
                                     out=Path(out) if out is not None else None)
        return sorted(p for p in Path(folder).glob("*.png") if not p.stem.endswith("_gallery"))

    def model(self, checkpoint: str = "best") -> Any:
        """The trained :class:`~fullslide.models.slide_model.SlideModel` (encoder + aggregator), in eval mode."""
        from fullslide.train.evaluate import load_run

        model = load_run(self.path, checkpoint)[2]
        return model.eval()


def train(config: ConfigLike = None, *, overrides: Sequence[str] = (), resume: str | Path | Run | None = None,
          progress: bool = True) -> Run:
    """Train end-to-end (or on frozen features with ``encoder.freeze``) and return the :class:`Run`. ``resume``
    continues an interrupted run folder from its last checkpoint (``config`` is then read from it)."""
    from fullslide.train.trainer import train as _train

    if resume is not None:
        resume_path = resume.path if isinstance(resume, Run) else Path(resume)
        return Run(_train(resume=resume_path, progress=progress, overrides=tuple(overrides)))
    return Run(_train(load_config(config, overrides), progress=progress))


def tile(slides: str | Path | Iterable[str | Path], out: str | Path, *, target_mpp: float = 0.5, tile_px: int = 224,
         tissue_threshold: float = 0.5, workers: int = 1, mpp: float | None = None, overwrite: bool = False,
         progress: bool = False) -> list[Any]:
    """Detect tissue and write tile coordinates (``out/patches/{slide_id}.h5``, CLAM/TRIDENT layout) for slides
    (paths, folders, or a cohort CSV); one :class:`~fullslide.slides.tiler.TileResult` per slide, failures included."""
    from fullslide.slides import tile_slides

    inputs = [slides] if isinstance(slides, (str, Path)) else list(slides)
    return tile_slides(inputs, out, target_mpp=target_mpp, tile_px=tile_px, tissue_threshold=tissue_threshold,
                       workers=workers, mpp=mpp, overwrite=overwrite, progress=progress)


def extract(config: ConfigLike, *, out: str | Path | None = None, overrides: Sequence[str] = (),
            progress: bool = False) -> Path:
    """Per-slide tile features with the config's encoder (the frozen baseline's input); returns the folder."""
    from fullslide.train.evaluate import extract as _extract

    folder, _, _ = _extract(load_config(config, overrides), out=Path(out) if out is not None else None,
                            progress=progress)
    return folder


def plan(config: ConfigLike, *, k: int | None = None, device_memory: str | None = None,
         slide_tiles: int | None = None, overrides: Sequence[str] = ()) -> Any:
    """Predict each memory mode's peak, the largest K that fits and auto's compute, without training
    (a :class:`~fullslide.train.plan.PlanReport`; its ``table()`` is what ``fullslide plan`` prints)."""
    from fullslide.train.plan import plan_config

    return plan_config(load_config(config, overrides), k=k, device_memory=device_memory, slide_tiles=slide_tiles)


def synth(out: str | Path, *, slides: int = 24, size: int | tuple[int, int] = 2048, signal: str = "focal",
          seed: int = 0, **kwargs: Any) -> Path:
    """A synthetic H&E-like cohort (pyramidal TIFFs, lesion masks, labels CSV); returns the CSV's path. ``kwargs``
    go to :func:`fullslide.slides.synth.make_cohort` (``lesion_fraction``, ``lesion_contrast``, ...)."""
    from fullslide.slides.synth import make_cohort

    wh = (size, size) if isinstance(size, int) else tuple(size)
    return make_cohort(out, slides, signal=signal, size=wh, seed=seed, **kwargs)


def open_slide(path: str | Path, **kwargs: Any) -> Any:
    """Open one slide (SVS, NDPI, MRXS, TIFF, ...) with the best installed reader; use as a context manager."""
    from fullslide.slides import open_slide as _open

    return _open(path, **kwargs)


__all__ = ["Run", "extract", "load_config", "open_slide", "plan", "synth", "tile", "train"]
