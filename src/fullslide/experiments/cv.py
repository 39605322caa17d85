"""``fullslide cv CONFIG --folds 5 [--seeds N] --out DIR``: k-fold cross-validation as papers report it.

Patients are dealt into ``folds`` stratified folds once (``data.split_method: kfold`` with the config's
``split_seed``: the same folds for every seed); run ``fold f`` tests on fold f, validates on fold f+1 (best
checkpoint by the config's selection metric) and trains on the rest. Every (fold, seed) is a normal run folder,
``DIR/runs/fold{f}_seed{s}``; a rerun of the command skips finished runs and resumes an interrupted one from its
last checkpoint. Each run is evaluated on its test and validation folds (``eval``: predictions, metrics with
bootstrap CIs, ROC/PR curves).

Outputs: ``results.csv`` (one row per seed, fold, split and metric: value and bootstrap 95% CI; then ``mean`` rows),
``results.md`` (per fold, and the mean over folds with a 95% t-interval across runs), and for classification
``curves/`` (every fold's test predictions pooled - each slide once per seed - and each fold: ``roc.csv``,
``pr.csv``, ``roc.png``, ``pr.png``). The interval across folds describes the spread of the estimate over folds;
folds share training patients, so it is the usual summary, not an exact confidence interval (Bengio & Grandvalet
2004 show no unbiased estimator of that variance exists).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from fullslide.atomic import atomic_write_text
from fullslide.errors import ConfigError
from fullslide.experiments.common import cached_run, check_settings, train_or_resume

log = logging.getLogger("fullslide.cv")
SPLITS = ("test", "val")
BOUNDED = {"auc", "accuracy", "balanced_accuracy", "c_index", "f1", "sensitivity", "specificity", "ap"}


def fold_config(base: Any, out: Path, fold: int, folds: int, seed: int) -> Any:
    """``base`` with the fold, seed and run folder of one cross-validation run."""
    from fullslide.api import load_config

    return load_config(base, [f"data.split_method=kfold", f"data.folds={folds}", f"data.fold={fold}",
                              f"train.seed={seed}", f"run_dir={out / 'runs' / f'fold{fold}_seed{seed}' / 'run'}"])


def run_cv(config: Any, out: str | Path, *, folds: int = 5, seeds: int = 1, seed_offset: int = 0,
           overrides: tuple[str, ...] = (), progress: bool = False) -> Path:
    """Run (or resume) every fold and seed, then write the tables and curves; returns ``results.md``."""
    from fullslide.api import load_config
    from fullslide.train.evaluate import evaluate_run

    if folds < 2:
        raise ConfigError(f"cv: --folds must be >= 2, got {folds}")
    base = load_config(config, overrides)
    out = Path(out)
    record = {k: v for k, v in dataclasses.asdict(base).items() if k != "run_dir"}
    check_settings(out, "cv", {"config": record, "folds": folds})
    runs = []
    for seed in range(seed_offset, seed_offset + seeds):
        for fold in range(folds):
            cfg = fold_config(base, out, fold, folds, seed)
            name = f"fold{fold}_seed{seed}"

            def fn(cfg: Any = cfg) -> dict[str, Any]:
                t0 = time.perf_counter()
                run_dir = train_or_resume(cfg, progress=progress)
                metrics = {}
                for split in SPLITS:
                    folder, line = evaluate_run(run_dir, split=split)
                    log.info("%s %s", run_dir.name, line)
                    metrics[split] = json.loads((folder / "metrics.json").read_text())["metrics"]
                return {"metrics": metrics, "seconds": round(time.perf_counter() - t0, 1)}

            result = cached_run(out / "runs", name, fn)
            runs.append({"fold": fold, "seed": seed, **result})
            log.info("cv %s: test %s", name, _line(result["metrics"]["test"]))
    if base.data.task == "classification":
        write_cv_curves(out, runs)  # first: the tables link the curves when they exist
    write_tables(out, runs, folds)
    return out / "results.md"


def _value(metric: Any) -> float | None:
    v = metric.get("value") if isinstance(metric, dict) else None
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _line(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_value(m):.3f}" for k, m in metrics.items() if _value(m) is not None)


def mean_ci(values: list[float], metric: str) -> tuple[float, float, float]:
    """Mean and 95% t-interval across runs, clipped to the metric's range (``[0, 1]`` for AUC and the like,
    ``>= 0`` for losses); a single run has no interval (its value twice)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if metric in BOUNDED:
        low, high = max(0.0, low), min(1.0, high)
    elif metric == "loss" or metric.endswith("_loss") or metric in ("mae", "rmse", "mse"):
        low = max(0.0, low)
    return mean, low, high


def write_tables(out: Path, runs: list[dict[str, Any]], folds: int) -> tuple[Path, Path]:
    names = [k for k, m in runs[0]["metrics"]["test"].items() if isinstance(m, dict) and "value" in m]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["seed", "fold", "split", "metric", "value", "ci_low", "ci_high"])
    for r in runs:
        for split in SPLITS:
            for name in names:
                m = r["metrics"][split].get(name) or {}
                writer.writerow([r["seed"], r["fold"], split, name, _fmt(m.get("value")), _fmt(m.get("ci_low")),
                                 _fmt(m.get("ci_high"))])
    summary: dict[tuple[str, str], tuple[float, float, float, int]] = {}
    for split in SPLITS:
        for name in names:
            values = [v for r in runs if (v := _value(r["metrics"][split].get(name) or {})) is not None]
            if values:
                summary[split, name] = (*mean_ci(values, name), len(values))
                mean, low, high, _ = summary[split, name]
                writer.writerow(["all", "mean", split, name, _fmt(mean), _fmt(low), _fmt(high)])
    atomic_write_text(out / "results.csv", buffer.getvalue())
    seeds = sorted({r["seed"] for r in runs})
    lines = [f"# Cross-validation: {folds} folds x {len(seeds)} seed(s)", "",
             f"Patient-level, stratified folds (the same for every seed); fold f is tested on fold f, validated on "
             f"fold f+1. Per run: value [bootstrap 95% CI over the fold's slides]. Mean: over the {len(runs)} runs, "
             "[95% t-interval across runs, clipped to the metric's range].", ""]
    for split in SPLITS:
        lines += [f"## {'Test' if split == 'test' else 'Validation'}", "",
                  "| seed | fold | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in runs:
            cells = []
            for name in names:
                m = r["metrics"][split].get(name) or {}
                v, lo, hi = _value(m), m.get("ci_low"), m.get("ci_high")
                cells.append("n/a" if v is None else f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None
                                                                  and hi is not None else ""))
            lines.append(f"| {r['seed']} | {r['fold']} | " + " | ".join(cells) + " |")
        cells = []
        for name in names:
            s = summary.get((split, name))
            cells.append("n/a" if s is None else f"**{s[0]:.3f}** [{s[1]:.3f}, {s[2]:.3f}]")
        lines += ["| **mean** | | " + " | ".join(cells) + " |", ""]
    if (out / "curves" / "roc.png").exists():
        lines += ["## Curves (test predictions of every fold pooled, and per fold)", "",
                  "![ROC](curves/roc.png) ![PR](curves/pr.png)", ""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    return out / "results.csv", out / "results.md"


def _fmt(value: Any) -> str:
    return "" if value is None else f"{float(value):.6g}"


def write_cv_curves(out: Path, runs: list[dict[str, Any]]) -> list[Path]:
    """Pooled (all folds' test predictions, per seed) and per-fold ROC/PR curves into ``out/curves``."""
    from fullslide.viz.curves import curve_inputs, write_curves

    groups: dict[str, Any] = {}
    pooled: dict[int, list[dict[str, str]]] = {}
    classes = None
    for r in runs:
        run_dir = out / "runs" / f"fold{r['fold']}_seed{r['seed']}" / "run"
        classes = json.loads((run_dir / "run.json").read_text())["classes"]
        with open(run_dir / "eval" / "test" / "predictions.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        groups[f"fold {r['fold']}" + (f" seed {r['seed']}" if len({x['seed'] for x in runs}) > 1 else "")] = \
            curve_inputs(rows, classes)
        pooled.setdefault(r["seed"], []).extend(rows)
    pooled_groups = {("pooled" if len(pooled) == 1 else f"pooled seed {s}"): curve_inputs(rows, classes)
                     for s, rows in pooled.items()}
    return write_curves({**pooled_groups, **groups}, out / "curves", "cross-validation, test folds",
                        emphasise=next(iter(pooled_groups)) if len(pooled_groups) == 1 else None)
