"""``fullslide experiment k-sweep``: does sampling more tiles per slide (K) lower the loss and raise the AUC?

Finding 1 of Campanella et al. 2024. One ``focal`` cohort whose positive slides carry lesions on about 1% of their
tissue, so that a small K often holds no lesion tile of a positive slide: its label is then noise for that step.
For each K and seed, the encoder (pretrained, as in ``e2e-vs-frozen``) and the aggregator are trained end-to-end
with the same schedule - same epochs, same steps, same learning rates; a larger K only sees more tiles per step,
as in the paper - and validated and tested on *all* tiles of each slide. Splits and cohort are fixed; seeds
change initialisation, sampling and augmentation. ``--context cache`` adds an arm per K < all with
``train.context: cache``: the same K tiles are encoded and back-propagated, and the aggregator also reads the
other tiles' cached features (rows carry ``"context": "none" | "cache"``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from fullslide.errors import ConfigError
from fullslide.experiments.common import (
    CohortSpec, PretrainSpec, RunSettings, cached_run, check_settings, prepare_cohort, prepare_encoder, run_config, train_and_test, write_results,
)

log = logging.getLogger("fullslide.experiment")
EXPERIMENT = "k-sweep"
DEFAULT_KS = "8,32,128,512,all"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(RunSettings):
    """One k-sweep; ``quick()`` is the 3-minute plumbing check."""

    pretrain: PretrainSpec = PretrainSpec()

    @staticmethod
    def quick() -> "Settings":
        return Settings(slides=12, size=1024, lesion_fraction=0.05, epochs=2, pretrain=PretrainSpec.quick())

    def cohort(self) -> CohortSpec:
        return CohortSpec(slides=self.slides, size=self.size, signal="focal", lesion_fraction=self.lesion_fraction,
                          lesion_contrast=self.lesion_contrast, stain_variation=self.stain_variation,
                          seed=self.cohort_seed)


def parse_ks(text: str) -> list[int | str]:
    """``"8,32,all"`` -> ``[8, 32, "all"]``; one line naming the bad item otherwise."""
    ks: list[int | str] = []
    for item in (t.strip().lower() for t in text.split(",")):
        if item == "all":
            ks.append("all")
        elif item.isdigit() and int(item) > 0:
            ks.append(int(item))
        else:
            raise ConfigError(f"--ks: {item!r} is not a positive whole number or 'all'")
    if not ks or len(set(ks)) != len(ks):
        raise ConfigError(f"--ks {text!r}: give distinct values, e.g. {DEFAULT_KS}")
    return ks


def parse_contexts(text: str) -> list[str]:
    """``"none,cache"`` -> ``["none", "cache"]``; one line naming the bad item otherwise."""
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in ("none", "cache")]
    if bad or not items or len(set(items)) != len(items):
        raise ConfigError(f"--context {text!r}: give none, cache or none,cache")
    return items


def run(out: str | Path, *, ks: list[int | str], seeds: int, seed_offset: int = 0, quick: bool = False,
        settings: Settings | None = None, contexts: tuple[str, ...] = ("none",)) -> Path:
    """Run the sweep into ``out`` (resuming) and return the report's path."""
    from fullslide.experiments.report import k_sweep_report
    from fullslide.slides import read_coords

    out = Path(out)
    settings = settings or (Settings.quick() if quick else Settings())
    workspace = out / "workspace"
    check_settings(out, EXPERIMENT, {**dataclasses.asdict(settings), "ks": ks})
    weights = prepare_encoder(workspace, settings.pretrain)
    cohort, tiles = prepare_cohort(workspace, "cohort_focal", settings.cohort())
    rows: list[dict[str, Any]] = []
    arms = [(k, c) for k in ks for c in contexts if not (c == "cache" and k == "all")]  # K = all has no rest to cache
    for seed in range(seed_offset, seed_offset + seeds):
        for k, context in arms:
            name = f"k{k}_seed{seed}" if context == "none" else f"k{k}_cache_seed{seed}"
            config = run_config(out / "runs" / name / "run", cohort, tiles, weights=weights, seed=seed,
                                epochs=settings.epochs, tiles_per_slide=k, encoder_lr=settings.encoder_lr,
                                context=context)

            def fn(config: Any = config) -> dict[str, Any]:
                result = train_and_test(config)
                result["tiles_seen"] = _tiles_seen(Path(config.run_dir))
                return result

            result = cached_run(out / "runs", name, fn)
            last = result["train_loss_by_epoch"][-1] if result["train_loss_by_epoch"] else None
            rows.append({"k": k, "context": context, "seed": seed, "final_train_loss": last, **result})
            log.info("K=%s%s seed %d: final training loss %s, test AUC %s (%.0f s)", k,
                     " +cache" if context == "cache" else "", seed, _fmt(last), _fmt(result["test_auc"]),
                     result["seconds"])
    n_tiles = sorted(len(read_coords(p)[0]) for p in Path(tiles).glob("patches/*.h5"))
    meta = {**dataclasses.asdict(settings), "ks": ks, "contexts": list(contexts), "quick": quick,
            "tiles_per_slide_median": n_tiles[len(n_tiles) // 2] if n_tiles else None}
    write_results(out, EXPERIMENT, rows, meta)
    return k_sweep_report(out, rows, meta)


def _tiles_seen(run_dir: Path) -> int:
    """Training tiles encoded over the whole run (the sum of the trainer's per-epoch ``train_tiles``)."""
    from fullslide.viz.report import read_metrics_csv

    return int(sum(r["train_tiles"] for r in read_metrics_csv(run_dir / "metrics.csv")))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
