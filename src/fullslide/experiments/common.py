"""What both experiments share: a cached synthetic cohort, a cached pretrained encoder, one run = train + test.

An experiment folder holds ``workspace/`` (cohorts, tiles, the pretrained encoder; each stage records the settings
it was made with and is rebuilt only when they change) and ``runs/NAME/`` (one training run each, and its
``result.json`` written atomically when the run has been trained *and* evaluated). A rerun of the same command
skips every run that has a ``result.json``: an interrupted experiment resumes at the first unfinished run, and that
run from its last checkpoint (``train --resume``, which equals an uninterrupted run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fullslide.atomic import atomic_write_text

log = logging.getLogger("fullslide.experiment")
TILE_PX, TARGET_MPP = 32, 1.0  # 32 px tiles at 1 um/px: tinycnn-sized, as the CPU budget requires


@dataclasses.dataclass(frozen=True, kw_only=True)
class CohortSpec:
    """A synthetic cohort (see ``fullslide.slides.synth.make_cohort``)."""

    slides: int
    size: int
    signal: str = "focal"
    lesion_fraction: float = 0.01
    lesion_contrast: float = 1.0
    diffuse_strength: float = 1.0
    stain_variation: float = 0.35
    positive_fraction: float = 0.5
    seed: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSettings:
    """What every experiment sets: its cohort and its training schedule (defaults: the 40-minute budget)."""

    slides: int = 80
    size: int = 3072
    lesion_fraction: float = 0.01
    lesion_contrast: float = 0.5
    stain_variation: float = 0.35
    cohort_seed: int = 0
    epochs: int = 10
    encoder_lr: float = 2e-4


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainSpec:
    """The experiments' "foundation model": an encoder pretrained with SimCLR (``fullslide pretrain``) on a
    separate cohort - other slides (its own seed) whose labels are never used.

    ``lesions=True`` (*in-domain*): half of that cohort's slides hold full-contrast lesions on 3% of the tissue, so
    the encoder learns to represent the lesion morphology the labelled task depends on. ``lesions=False``
    (*out-of-domain*): no slide holds a lesion, so the encoder learns normal tissue only - the situation of a general
    pathology model meeting a task-specific morphology it never saw (EXPERIMENTS.md)."""

    slides: int = 16
    size: int = 3072
    epochs: int = 20
    tiles_per_slide: int = 512
    batch: int = 256
    stain_variation: float = 0.35
    seed: int = 1000
    lesions: bool = True
    encoder: str = "tinycnn"
    encoder_kwargs: tuple[tuple[str, Any], ...] = ()
    lr: float = 2e-3

    @staticmethod
    def quick(**changes: Any) -> "PretrainSpec":
        return dataclasses.replace(PretrainSpec(slides=3, size=1024, epochs=2, tiles_per_slide=256, batch=64), **changes)

    def cohort(self) -> CohortSpec:
        return CohortSpec(slides=self.slides, size=self.size, signal="focal", lesion_fraction=0.03,
                          stain_variation=self.stain_variation, seed=self.seed,
                          positive_fraction=0.5 if self.lesions else 0.0)

    def settings(self) -> Any:
        from fullslide.train.pretrain import PretrainSettings

        return PretrainSettings(encoder=self.encoder, encoder_kwargs=dict(self.encoder_kwargs), epochs=self.epochs,
                                tiles_per_slide=self.tiles_per_slide, batch=self.batch, lr=self.lr)


def check_settings(out: Path, experiment: str, settings: dict[str, Any]) -> None:
    """An experiment folder holds one experiment with one set of settings: refuse to mix (its finished runs
    would be kept and reported beside runs made with other settings)."""
    from fullslide.errors import ConfigError

    path = out / "experiment.json"
    record = json.loads(json.dumps({"experiment": experiment, "settings": settings}))  # tuples -> lists
    if path.exists():
        if json.loads(path.read_text()) != record:
            raise ConfigError(f"{out}: holds a {json.loads(path.read_text()).get('experiment')} experiment with other "
                              "settings (see its experiment.json); use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1))


def _stage(folder: Path, settings: dict[str, Any], build: Callable[[], None]) -> None:
    """Run ``build`` unless ``folder/stage.json`` records the same settings (then the folder is reused)."""
    marker = folder / "stage.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    build()
    atomic_write_text(marker, json.dumps(settings, indent=1))


def prepare_cohort(root: Path, name: str, spec: CohortSpec, *, workers: int = 2, sites: int = 1,
                   site_shift: float = 0.0, site_confounding: float = 0.0) -> tuple[Path, Path]:
    """Synthesize and tile ``spec`` under ``root/name`` (cached); returns (labels CSV, tiles folder). ``sites`` and
    ``site_shift``: patients from several sites with their own stains (``make_cohort``)."""
    from fullslide.slides import tile_slides
    from fullslide.slides.synth import make_cohort

    folder = root / name

    def build() -> None:
        t0 = time.perf_counter()
        csv = make_cohort(folder / "cohort", spec.slides, signal=spec.signal, size=(spec.size, spec.size), mpp=0.5,
                          lesion_fraction=spec.lesion_fraction, lesion_contrast=spec.lesion_contrast,
                          diffuse_strength=spec.diffuse_strength, stain_variation=spec.stain_variation,
                          positive_fraction=spec.positive_fraction, seed=spec.seed, sites=sites,
                          site_shift=site_shift, site_confounding=site_confounding, workers=workers)
        results = tile_slides([csv], folder / "tiles", target_mpp=TARGET_MPP, tile_px=TILE_PX, workers=workers)
        bad = [r for r in results if r.failed]
        if bad:
            log.warning("%s: %d slide(s) failed tiling: %s", name, len(bad), bad[0].message)
        log.info("cohort %s: %d slides synthesized and tiled in %.0f s", name, spec.slides, time.perf_counter() - t0)

    sited = {"sites": sites, "site_shift": site_shift, "site_confounding": site_confounding} if sites > 1 else {}
    _stage(folder, {"cohort": dataclasses.asdict(spec), "tile_px": TILE_PX, "target_mpp": TARGET_MPP, **sited}, build)
    return folder / "cohort" / "labels.csv", folder / "tiles"


def prepare_encoder(root: Path, pretrain_spec: PretrainSpec, name: str = "encoder") -> Path:
    """The pretrained encoder of ``pretrain_spec`` (cached in ``root/name``); returns the weights file."""
    from fullslide.train.pretrain import pretrain

    spec, settings = pretrain_spec.cohort(), pretrain_spec.settings()
    cohort_name = "pretrain_cohort" if pretrain_spec.lesions else "pretrain_cohort_no_lesions"
    _, tiles = prepare_cohort(root, cohort_name, spec)
    folder = root / name
    weights = folder / "pretrained.safetensors"

    def build() -> None:
        record = pretrain(tiles, weights, settings)
        log.info("pretrained %s on %d tiles of %d slides in %.0f s: contrastive loss %.3f -> %.3f", settings.encoder,
                 record["tiles"], record["slides"], record["seconds"], record["loss_by_epoch"][0],
                 record["loss_by_epoch"][-1])

    _stage(folder, {"cohort": dataclasses.asdict(spec), "pretrain": dataclasses.asdict(settings)}, build)
    return weights


def run_config(run_dir: Path, cohort: Path, tiles: Path, *, weights: Path, seed: int, epochs: int,
               tiles_per_slide: int | str, encoder_lr: float, features_dir: Path | None = None, context: str = "none",
               aggregator_lr: float = 1e-3, encoder: str = "tinycnn", encoder_kwargs: dict[str, Any] | None = None,
               finetune: dict[str, Any] | None = None, split_method: str = "fractions",
               extra: dict[str, dict[str, Any]] | None = None):
    """The training config every experiment run shares: an encoder (``tinycnn`` unless told) + gated attention,
    fixed patient-level splits (``split_seed`` 0 whatever the run's seed), 2 slides per step, validation on all tiles
    every epoch, best checkpoint by validation loss. ``features_dir`` makes it the frozen baseline; ``context: cache``
    gives the aggregator every tile each step (the rest from the feature cache); ``finetune`` adds encoder keys
    (``trainable_blocks``, ``lora_rank``); ``split_method: column`` takes the cohort's split column; ``extra`` adds
    keys to any section."""
    from fullslide.train.config import config_from_dict

    raw = {
        "run_dir": str(run_dir),
        "data": {"cohort": str(cohort), "coords_dir": str(tiles), "target_mpp": TARGET_MPP, "tile_px": TILE_PX,
                 "fractions": [0.5, 0.2, 0.3], "split_seed": 0, "split_method": split_method,
                 **({"features_dir": str(features_dir)} if features_dir else {})},
        "encoder": {"name": encoder, "weights": str(weights), "lr": encoder_lr, "freeze": features_dir is not None,
                    "kwargs": dict(encoder_kwargs or {}), **(finetune or {})},
        "aggregator": {"name": "gma", "lr": aggregator_lr},
        "train": {"epochs": epochs, "tiles_per_slide": tiles_per_slide, "slides_per_step": 2, "chunk_tiles": 64,
                  "warmup_epochs": 0.5, "min_lr_ratio": 0.1, "selection_metric": "loss", "loader_workers": 1,
                  "seed": seed, "device": "cpu", "context": context},
        "eval": {"chunk_tiles": 256, "bootstrap": 1000},
    }
    for section, values in (extra or {}).items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def train_or_resume(config: Any, progress: bool = False) -> Path:
    """Train ``config``, or resume its run from the last checkpoint when an earlier session was interrupted (a
    folder without one is cleared first: a run never mixes two starts). Returns the run folder."""
    from fullslide.train.trainer import train

    run_dir = Path(config.run_dir)
    if (run_dir / "checkpoints" / "last.json").exists():
        log.info("%s: resuming the interrupted run", run_dir.name)
        return train(resume=run_dir, progress=progress)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return train(config, progress=progress)


def train_and_test(config: Any) -> dict[str, Any]:
    """Train ``config`` (resuming an interrupted run from its last checkpoint; a folder without one is cleared),
    then score the best checkpoint on the test split. Returns per-epoch curves and test metrics (value and 95% CI);
    ``seconds`` counts this session's part of a resumed run."""
    from fullslide.train.evaluate import evaluate_run
    from fullslide.viz.report import read_metrics_csv

    run_dir = Path(config.run_dir)
    t0 = time.perf_counter()
    train_or_resume(config)
    history = read_metrics_csv(run_dir / "metrics.csv")
    folder, _ = evaluate_run(run_dir, split="test")
    test = json.loads((folder / "metrics.json").read_text())["metrics"]

    def column(key: str) -> list[float | None]:
        return [_finite(row.get(key)) for row in history]

    def metric(name: str) -> tuple[float | None, list[float | None]]:
        m = test.get(name) or {}
        return _finite(m.get("value")), [_finite(m.get("ci_low")), _finite(m.get("ci_high"))]

    (auc, auc_ci), (loss, loss_ci) = metric("auc"), metric("loss")
    finite = [(v, e) for e, v in enumerate(column("val_loss"), start=1) if v is not None]
    return {
        "best_epoch": min(finite)[1] if finite else None,
        "train_loss_by_epoch": column("train_loss"), "val_loss_by_epoch": column("val_loss"),
        "val_auc_by_epoch": column("val_auc"), "test_auc": auc, "test_auc_ci": auc_ci, "test_loss": loss,
        "test_loss_ci": loss_ci,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _finite(value: Any) -> float | None:
    """A float, or None for a missing or non-finite value (results.json stays strict JSON)."""
    import math

    return float(value) if value is not None and math.isfinite(float(value)) else None


def cached_run(runs_dir: Path, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``'s result for run ``name``, computed once: a finished run (its result.json) is never redone."""
    result_path = runs_dir / name / "result.json"
    if result_path.exists():
        log.info("%s: done before, kept", name)
        return json.loads(result_path.read_text())
    result = fn()
    result_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(result_path, json.dumps(result, indent=1))
    return result


def write_results(out: Path, experiment: str, runs: list[dict[str, Any]], settings: dict[str, Any],
                  extra: dict[str, Any] | None = None) -> Path:
    """``out/results.json``: ``{"experiment", "settings", "runs", ...extra}`` (the schema in EXPERIMENTS.md)."""
    path = out / "results.json"
    record = {"experiment": experiment, "settings": settings, "runs": runs, **(extra or {})}
    atomic_write_text(path, json.dumps(record, indent=1))
    return path
