"""``fullslide experiment e2e-vs-frozen``: when does fine-tuning a pretrained encoder end-to-end beat keeping it frozen?

Finding 2 of Campanella et al. 2024: end-to-end training of a pretrained pathology encoder beats the same encoder
frozen under a MIL aggregator. The paper's setting is a *general* pathology model meeting a task-specific morphology
it was never trained to tell apart (EGFR status in LUAD). The experiment measures the answer as a function of the
situation, with two "foundation models" pretrained by ``fullslide pretrain`` (SimCLR) on separate, unlabelled cohorts:

* ``out-of-domain``: pretrained on slides without any lesion - it never saw the label's morphology;
* ``in-domain``: pretrained on slides half of which hold full-contrast lesions - it did.

On each labelled cohort (``focal``: small lesion foci; ``diffuse``: a slight shift over all tissue), for each seed,
every arm starts from the same pretrained weights, with the same patient-level splits, aggregator (gated attention),
epochs, schedule and tiles per step:

* ``frozen``: ``extract`` features once, train the aggregator on them (the usual two-stage pipeline);
* ``e2e``: encoder and aggregator jointly, exact gradients, on the same tiles per step as the frozen arm;
* ``e2e-cache``: end-to-end on ``cache_k`` sampled tiles per slide per step, the aggregator reading every tile
  (``train.context: cache``) - the cheap arm;
* with ``--archs cnn,vit``, a small ViT (patch 8 on 32 px tiles) pretrained the same way adds ``e2e-lastN``
  (``encoder.trainable_blocks``) and ``e2e-lora`` (``encoder.lora_rank``), as the paper fine-tuned a ViT-base.

Learning rates are per arm (``Settings.lrs``); ``--tune-lr`` chooses them on validation loss first (a tuning seed
the reported seeds never use). A linear probe (``probe.py``) on frozen tile features says whether each encoder
represents the signal, before and after fine-tuning. Results: ``results.json`` (runs and probes), ``report.md``,
``e2e_vs_frozen.png`` (test AUC per seed with bootstrap CIs) and ``probe.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from fullslide.experiments.common import (
    CohortSpec, PretrainSpec, RunSettings, cached_run, check_settings, prepare_cohort, prepare_encoder, run_config,
    train_and_test, write_results,
)
from fullslide.atomic import atomic_write_text

log = logging.getLogger("fullslide.experiment")
EXPERIMENT = "e2e-vs-frozen"
SITUATIONS = ("out-of-domain", "in-domain")
ARCHS = ("cnn", "vit")
ARMS = {"cnn": ("frozen", "e2e", "e2e-cache"), "vit": ("frozen", "e2e", "e2e-lastN", "e2e-lora")}
ENCODERS = {"cnn": ("tinycnn", ()),
            # a ViT-Tiny-shaped transformer cut to 32 px tiles: 16 patches of 8 px, 4 blocks of width 96
            "vit": ("vit_tiny_patch16_224", (("img_size", 32), ("patch_size", 8), ("embed_dim", 96), ("depth", 4),
                                              ("num_heads", 3)))}
TUNE_SEED = 100  # learning rates are chosen on validation runs of this seed, never one that is reported
#: (arm, encoder lr, aggregator lr); the encoder lr is unused by the frozen arm. Chosen on validation (EXPERIMENTS.md).
DEFAULT_LRS = (("frozen", 0.0, 1e-3), ("e2e", 2e-4, 1e-3), ("e2e-cache", 2e-4, 1e-3), ("e2e-lastN", 2e-4, 1e-3),
               ("e2e-lora", 1e-3, 1e-3))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(RunSettings):
    """One e2e-vs-frozen experiment; ``quick()`` is the 3-minute plumbing check."""

    slides: int = 50
    size: int = 2048
    lesion_fraction: float = 0.02
    lesion_contrast: float = 0.4
    diffuse_strength: float = 0.5
    epochs: int = 10
    tiles_per_slide: int | str = "all"
    """Tiles per slide per step of the frozen and e2e arms (the same for both: a fair comparison)."""
    cache_k: int = 32
    """Sampled tiles per slide per step of the ``e2e-cache`` arm."""
    last_blocks: int = 2
    lora_rank: int = 4
    situations: tuple[str, ...] = SITUATIONS
    archs: tuple[str, ...] = ("cnn",)
    lrs: tuple[tuple[str, float, float], ...] = DEFAULT_LRS
    pretrain: PretrainSpec = PretrainSpec()
    """The in-domain encoder's pretraining; the out-of-domain one is the same without lesions and with its own seed."""

    @staticmethod
    def quick(**changes: Any) -> "Settings":
        return dataclasses.replace(Settings(slides=12, size=1024, lesion_fraction=0.05, epochs=2, cache_k=16,
                                            pretrain=PretrainSpec.quick()), **changes)

    def cohort(self, signal: str) -> CohortSpec:
        return CohortSpec(slides=self.slides, size=self.size, signal=signal, lesion_fraction=self.lesion_fraction,
                          lesion_contrast=self.lesion_contrast, diffuse_strength=self.diffuse_strength,
                          stain_variation=self.stain_variation, seed=self.cohort_seed)

    def pretrain_spec(self, situation: str, arch: str) -> PretrainSpec:
        name, kwargs = ENCODERS[arch]
        spec = dataclasses.replace(self.pretrain, encoder=name, encoder_kwargs=kwargs,
                                   lr=self.pretrain.lr if arch == "cnn" else min(self.pretrain.lr, 1e-3))
        if situation == "out-of-domain":
            spec = dataclasses.replace(spec, lesions=False, seed=spec.seed + 1000)
        return spec

    def lr(self, arm: str) -> tuple[float, float]:
        for name, encoder_lr, aggregator_lr in self.lrs:
            if name == arm:
                return encoder_lr, aggregator_lr
        raise KeyError(arm)

    def arms(self, arch: str) -> tuple[str, ...]:
        return ARMS[arch]


def arm_overrides(settings: Settings, arch: str, arm: str) -> dict[str, Any]:
    """What sets one arm apart in ``run_config``: the encoder, tiles per step, context, fine-tuning controls."""
    encoder, kwargs = ENCODERS[arch]
    finetune = {"e2e-lastN": {"trainable_blocks": settings.last_blocks},
                "e2e-lora": {"lora_rank": settings.lora_rank, "lora_alpha": float(2 * settings.lora_rank)}}.get(arm)
    return {"encoder": encoder, "encoder_kwargs": dict(kwargs), "finetune": finetune,
            "tiles_per_slide": settings.cache_k if arm == "e2e-cache" else settings.tiles_per_slide,
            "context": "cache" if arm == "e2e-cache" else "none"}


def arm_config(out: Path, settings: Settings, *, situation: str, arch: str, arm: str, signal: str, seed: int,
               weights: Path, lrs: tuple[float, float], name: str) -> Any:
    """The training config of one arm (see the module docstring)."""
    workspace = out / "workspace"
    cohort, tiles = prepare_cohort(workspace, f"cohort_{signal}", settings.cohort(signal))
    features = workspace / f"features_{signal}_{situation}_{arch}" if arm == "frozen" else None
    return run_config(out / "runs" / name / "run", cohort, tiles, weights=weights, seed=seed, epochs=settings.epochs,
                      encoder_lr=lrs[0] or 1e-4, aggregator_lr=lrs[1], features_dir=features,
                      **arm_overrides(settings, arch, arm))


def train_arm(out: Path, config: Any, name: str, frozen: bool) -> dict[str, Any]:
    """Train and test one arm (cached in ``out/runs/name``)."""

    def fn() -> dict[str, Any]:
        if frozen:
            from fullslide.train.evaluate import extract

            extract(config)  # once per cohort and encoder: later seeds find the files up to date (same fingerprint)
        return train_and_test(config)

    return cached_run(out / "runs", name, fn)


def tune_lrs(out: Path, settings: Settings, signal: str, grid: list[float],
             weights: dict[tuple[str, str], Path]) -> Settings:
    """Choose each arm's learning rate on validation: at ``TUNE_SEED`` on ``signal``, each value of ``grid`` as the
    arm's encoder lr (the aggregator's for the frozen arm); the lowest best-epoch validation loss wins, per arm
    over all situations and architectures (one rule per arm, as a user would set it). Writes ``tuning.json``."""
    trials = []
    for situation in settings.situations:
        for arch in settings.archs:
            for arm in settings.arms(arch):
                for value in grid:
                    lrs = (0.0, value) if arm == "frozen" else (value, settings.lr(arm)[1])
                    name = f"tune_{situation}_{arch}_{signal}_{arm}_lr{value:g}"
                    config = arm_config(out, settings, situation=situation, arch=arch, arm=arm, signal=signal,
                                        seed=TUNE_SEED, weights=weights[situation, arch], lrs=lrs, name=name)
                    result = train_arm(out, config, name, arm == "frozen")
                    losses = [v for v in result["val_loss_by_epoch"] if v is not None]
                    trials.append({"situation": situation, "arch": arch, "arm": arm, "lr": value,
                                   "best_val_loss": min(losses) if losses else None,
                                   "best_epoch": result.get("best_epoch")})
    chosen = []
    for arm, encoder_lr, aggregator_lr in settings.lrs:
        mine = [t for t in trials if t["arm"] == arm and t["best_val_loss"] is not None]
        if not mine:
            chosen.append((arm, encoder_lr, aggregator_lr))
            continue
        score = {v: sum(t["best_val_loss"] for t in mine if t["lr"] == v) for v in grid}
        best = min(score, key=lambda v: score[v])
        chosen.append((arm, 0.0, best) if arm == "frozen" else (arm, best, aggregator_lr))
        log.info("tune: %s -> lr %g (validation loss summed over situations: %s)", arm, best,
                 ", ".join(f"{v:g}: {s:.3f}" for v, s in score.items()))
    atomic_write_text(out / "tuning.json", json.dumps({"signal": signal, "seed": TUNE_SEED, "grid": grid,
                                                       "trials": trials, "chosen": chosen}, indent=1))
    return dataclasses.replace(settings, lrs=tuple(chosen))


def run_probes(out: Path, settings: Settings, signal: str, situation: str, arch: str, weights: Path,
               runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Linear probes on one cohort: the pretrained encoder, then each fine-tuned run's best checkpoint (cached in
    ``out/probes``)."""
    from fullslide.data.splits import read_splits_csv
    from fullslide.experiments.probe import linear_probe, probe_tiles
    from fullslide.models import create_encoder
    from fullslide.train.evaluate import load_run

    tuned = [r for r in runs if r["model"] != "frozen"]
    if not tuned:
        return []
    first_run = out / "runs" / tuned[0]["run"] / "run"
    cohort, tiles = prepare_cohort(out / "workspace", f"cohort_{signal}", settings.cohort(signal))
    cache = out / "probes" / f"{situation}_{arch}_{signal}.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    data = None
    rows = []
    for key, row in [("pretrained", None)] + [(r["run"], r) for r in tuned]:
        if key not in done:
            if data is None:
                data = probe_tiles(cohort, tiles, read_splits_csv(first_run / "splits.csv"), signal)
            if row is None:
                name, kwargs = ENCODERS[arch]
                encoder = create_encoder(name, weights=weights, tile_px=32, **dict(kwargs))
            else:
                encoder = load_run(out / "runs" / key / "run")[2].encoder
            done[key] = linear_probe(encoder, data)
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps(done, indent=1))
        rows.append({"encoder": situation, "arch": arch, "signal": signal,
                     "stage": "pretrained" if row is None else "fine-tuned",
                     "model": None if row is None else row["model"], "seed": None if row is None else row["seed"],
                     **done[key]})
    return rows


def run(out: str | Path, *, signals: list[str], seeds: int, seed_offset: int = 0, quick: bool = False,
        settings: Settings | None = None, tune_grid: list[float] | None = None) -> Path:
    """Run the experiment into ``out`` (resuming) and return the report's path."""
    from fullslide.experiments.report import e2e_report

    out = Path(out)
    settings = settings or (Settings.quick() if quick else Settings())
    record = {**dataclasses.asdict(settings), "signals": signals, "tune_grid": tune_grid}
    check_settings(out, EXPERIMENT, record)
    weights = {(situation, arch): prepare_encoder(out / "workspace", settings.pretrain_spec(situation, arch),
                                                  name=f"encoder_{situation}_{arch}")
               for situation in settings.situations for arch in settings.archs}
    if tune_grid:
        settings = tune_lrs(out, settings, signals[0], tune_grid, weights)
    rows, probes = [], []
    for situation in settings.situations:
        for arch in settings.archs:
            for signal in signals:
                group = []
                for seed in range(seed_offset, seed_offset + seeds):
                    for arm in settings.arms(arch):
                        name = f"{situation}_{arch}_{signal}_{arm}_seed{seed}"
                        lrs = settings.lr(arm)
                        config = arm_config(out, settings, situation=situation, arch=arch, arm=arm, signal=signal,
                                            seed=seed, weights=weights[situation, arch], lrs=lrs, name=name)
                        result = train_arm(out, config, name, arm == "frozen")
                        group.append({"encoder": situation, "arch": arch, "model": arm, "signal": signal,
                                      "seed": seed, "run": name, "encoder_lr": None if arm == "frozen" else lrs[0],
                                      "aggregator_lr": lrs[1], **result})
                        log.info("%s %s %s %s seed %d: test AUC %s, test loss %s (%.0f s)", situation, arch, signal,
                                 arm, seed, _fmt(result["test_auc"]), _fmt(result["test_loss"]), result["seconds"])
                rows += group
                probes += run_probes(out, settings, signal, situation, arch, weights[situation, arch], group)
    write_results(out, EXPERIMENT, rows, {**record, "lrs": [list(x) for x in settings.lrs], "quick": quick},
                  extra={"probes": probes})
    return e2e_report(out, rows, probes, settings)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
