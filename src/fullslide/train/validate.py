"""Validation and evaluation: predictions on ALL tiles, the loss, metrics with bootstrap CIs, the CSV.

Shared by ``train`` (validation each epoch, point estimates only) and ``eval`` / ``predict`` (bootstrap 95%
intervals, predictions.csv, metrics.json).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fullslide.atomic import atomic_write_text
from fullslide.data.cohort import CohortTable
from fullslide.data.loader import SlideSource
from fullslide.errors import ConfigError
from fullslide.train.config import Config
from fullslide.train.inference import SlidePrediction, predict_with_config


def selection(config: Config, n_classes: int) -> tuple[str, bool]:
    """(validation metric that picks the best checkpoint, whether higher is better)."""
    from fullslide.train.metrics import higher_is_better, primary_metric

    name = config.train.selection_metric
    if name == "auto":
        name = primary_metric(config.data.task, n_classes)
    if name == "loss":
        return "loss", False
    try:
        return name, higher_is_better(name)
    except ConfigError as exc:
        raise ConfigError(f"config key 'train.selection_metric': {exc}") from exc


def score_predictions(
    task: str, cohort: CohortTable, preds: Sequence[SlidePrediction], *, loss_fn: Any = None, n_bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Loss (when ``loss_fn``) and metrics of the readable, labelled slides: ``{name: {"value", ...}}``."""
    from fullslide.train.metrics import compute_metrics

    ok = [p for p in preds if not p.error]
    if not ok:
        return {}
    records = [cohort.by_id(p.slide_id) for p in ok]
    table = cohort.targets()
    row = {r.slide_id: i for i, r in enumerate(cohort.records)}
    y = table[[row[r.slide_id] for r in records]]
    logits = torch.as_tensor(np.stack([p.logits for p in ok]), dtype=torch.float32)
    from fullslide.train.losses import predictions

    out: dict[str, Any] = {}
    if loss_fn is not None:
        target = torch.as_tensor(y, dtype=torch.long if task == "classification" else torch.float32)
        with torch.no_grad():
            out["loss"] = {"value": float(loss_fn(logits, target)), "n": len(ok)}
    try:
        out.update(compute_metrics(task, y, predictions(task, logits), groups=[r.patient_id for r in records],
                                   n_bootstrap=n_bootstrap, seed=seed, classes=cohort.classes or None))
    except (ValueError, ConfigError) as exc:  # e.g. one class only among the slides: metrics undefined
        out["error"] = {"value": None, "message": str(exc)}
    return out


def flat(metrics: dict[str, Any]) -> dict[str, float]:
    """``{name: {"value": v}}`` -> ``{name: v}`` (NaN where undefined), for metrics.csv and TensorBoard."""
    return {k: (math.nan if m.get("value") is None else float(m["value"]))
            for k, m in metrics.items() if isinstance(m, dict) and "value" in m and k != "error"}


def evaluate_sources(trainer: Any, sources: Sequence[SlideSource], *, n_bootstrap: int = 0) -> dict[str, float]:
    """Validation inside training: all tiles of ``sources`` with the trainer's model -> flat metrics."""
    cfg = trainer.config
    preds = predict_with_config(cfg, trainer.model, sources, trainer.ctx, amp_dtype=trainer.amp,
                                stain=trainer.data.stain)
    scores = score_predictions(cfg.data.task, trainer.data.cohort, preds, loss_fn=trainer.loss_fn,
                               n_bootstrap=n_bootstrap, seed=cfg.train.seed)
    values = flat(scores)
    values["failed_slides"] = sum(1 for p in preds if p.error)
    return values


def prediction_rows(task: str, cohort: CohortTable | None, classes: Sequence[str],
                    preds: Sequence[SlidePrediction], split: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per slide: slide_id, patient_id, split, prediction columns, label columns, error."""
    from fullslide.train.losses import predictions

    rows = []
    known = set(cohort.slide_ids) if cohort is not None else set()
    for p in preds:
        rec = cohort.by_id(p.slide_id) if p.slide_id in known else None
        row: dict[str, Any] = {"slide_id": p.slide_id, "patient_id": rec.patient_id if rec else ""}
        if split is not None:
            row["split"] = split.get(p.slide_id, "")
        values = predictions(task, torch.as_tensor(p.logits[None])) if not p.error else None
        if task == "classification":
            for c, name in enumerate(classes):
                row[f"prob_{name}"] = "" if values is None else f"{values[0, c]:.6f}"
            row["prediction"] = "" if values is None else classes[int(values[0].argmax())]
            row["label"] = (rec.label or "") if rec else ""
        elif task == "survival":
            row["risk"] = "" if values is None else f"{values[0]:.6f}"
            row["time"] = "" if rec is None or rec.time is None else rec.time
            row["event"] = "" if rec is None or rec.event is None else rec.event
        else:
            row["prediction"] = "" if values is None else f"{values[0]:.6f}"
            row["target"] = "" if rec is None or rec.target is None else rec.target
        row["error"] = p.error
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows with the same keys -> CSV, atomically."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))
