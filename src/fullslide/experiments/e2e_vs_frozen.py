"""``fullslide experiment e2e-vs-frozen``: fine-tune the pretrained encoder end-to-end, or keep it frozen.

Finding 2 of Campanella et al. 2024: end-to-end training of a pretrained pathology encoder beats the same encoder
frozen under a MIL aggregator. Here the "foundation model" is ``tinycnn`` pretrained with SimCLR
(``fullslide pretrain``) on a separate, unlabelled synthetic cohort; both arms start from it, on the same cohort,
patient-level splits, aggregator, schedule and metrics:

* ``frozen``: ``extract`` features with the pretrained encoder once, then train the gated-attention aggregator on
  them, all tiles of every slide per step (the usual two-stage pipeline, at its strongest);
* ``e2e``: train encoder and aggregator jointly on K sampled tiles per slide per step (exact gradients).

For each signal (``focal``: small lesion foci; ``diffuse``: a slight shift over all tissue) and seed, both arms are
trained and scored on the test slides (all tiles, bootstrap CIs). Seeds change initialisation, sampling and
augmentation; the cohorts, splits and pretrained encoder are fixed.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from fullslide.experiments.common import (
    CohortSpec, PretrainSpec, RunSettings, cached_run, check_settings, prepare_cohort, prepare_encoder, run_config, train_and_test, write_results,
)

log = logging.getLogger("fullslide.experiment")
EXPERIMENT = "e2e-vs-frozen"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(RunSettings):
    """One e2e-vs-frozen experiment; ``quick()`` is the 3-minute plumbing check."""

    lesion_contrast: float = 0.4
    diffuse_strength: float = 0.5
    tiles_per_slide: int | str = 256
    pretrain: PretrainSpec = PretrainSpec()

    @staticmethod
    def quick() -> "Settings":
        return Settings(slides=12, size=1024, lesion_fraction=0.05, epochs=2, tiles_per_slide=32,
                        pretrain=PretrainSpec.quick())

    def cohort(self, signal: str) -> CohortSpec:
        return CohortSpec(slides=self.slides, size=self.size, signal=signal, lesion_fraction=self.lesion_fraction,
                          lesion_contrast=self.lesion_contrast, diffuse_strength=self.diffuse_strength,
                          stain_variation=self.stain_variation, seed=self.cohort_seed)


def run_pair(out: Path, settings: Settings, signal: str, seed: int, weights: Path) -> list[dict[str, Any]]:
    """Both arms for one signal and seed (each cached in ``out/runs``)."""
    workspace = out / "workspace"
    cohort, tiles = prepare_cohort(workspace, f"cohort_{signal}", settings.cohort(signal))
    runs = out / "runs"
    rows = []
    for model in ("e2e", "frozen"):
        name = f"{signal}_{model}_seed{seed}"
        features = workspace / f"features_{signal}" if model == "frozen" else None
        config = run_config(runs / name / "run", cohort, tiles, weights=weights, seed=seed, epochs=settings.epochs,
                            tiles_per_slide="all" if model == "frozen" else settings.tiles_per_slide,
                            encoder_lr=settings.encoder_lr, features_dir=features)

        def fn(config: Any = config, features: Path | None = features) -> dict[str, Any]:
            if features is not None:
                from fullslide.train.evaluate import extract

                extract(config)  # once per cohort: later seeds find the files up to date (same encoder fingerprint)
            return train_and_test(config)

        result = cached_run(runs, name, fn)
        rows.append({"model": model, "signal": signal, "seed": seed, **result})
        log.info("%s %s seed %d: test AUC %s, test loss %s (%.0f s)", signal, model, seed,
                 _fmt(result["test_auc"]), _fmt(result["test_loss"]), result["seconds"])
    return rows


def run(out: str | Path, *, signals: list[str], seeds: int, seed_offset: int = 0, quick: bool = False,
        settings: Settings | None = None) -> Path:
    """Run the experiment into ``out`` (resuming) and return the report's path."""
    from fullslide.experiments.report import e2e_report

    out = Path(out)
    settings = settings or (Settings.quick() if quick else Settings())
    check_settings(out, EXPERIMENT, {**dataclasses.asdict(settings), "signals": signals})
    weights = prepare_encoder(out / "workspace", settings.pretrain)
    rows = []
    for signal in signals:
        for seed in range(seed_offset, seed_offset + seeds):
            rows += run_pair(out, settings, signal, seed, weights)
    write_results(out, EXPERIMENT, rows, {**dataclasses.asdict(settings), "signals": signals, "quick": quick})
    return e2e_report(out, rows, settings)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
