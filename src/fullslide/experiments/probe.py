"""Linear probes on frozen tile features: does an encoder *represent* what the slide label depends on?

For the ``focal`` signal the question is tile-level and has ground truth: lesion tile (at least half of the tile
inside the synthetic lesion mask) against normal tile (no lesion at all), both drawn from positive slides. For the
``diffuse`` signal there is no mask; the probe asks whether a single tile tells a positive slide from a negative one.

A probe is an L2-regularised logistic regression on standardised features, fitted on the tiles of the training
slides and scored (ROC AUC) on the tiles of the test slides - the same patient-level split as the runs. It is run
on the pretrained encoder (before) and on the encoder of an end-to-end run's best checkpoint (after fine-tuning):
a high probe AUC means a frozen pipeline *can* find the signal in the features; a low one that the encoder is
partly blind to it and only fine-tuning can make it visible.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

LESION_TILE, NORMAL_TILE = 0.5, 0.0  # lesion tile: >= half covered; normal tile: not covered at all
MAX_TILES_PER_SLIDE = 160  # per class and slide: a few thousand tiles per probe, seconds on a CPU


def probe_tiles(cohort_csv: Path, tiles_dir: Path, splits: dict[str, str], signal: str, *,
                seed: int = 0) -> dict[str, Any]:
    """The probe's tiles: ``{"train"|"test": (uint8 tiles [N, 3, P, P], labels [N])}`` read once, reused for every
    encoder probed on this cohort."""
    from fullslide.slides import open_slide, read_coords
    from fullslide.slides.synth import lesion_fraction

    with open(cohort_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rng = np.random.default_rng(seed)
    parts: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {"train": ([], []), "test": ([], [])}
    for row in rows:
        split = splits.get(row["slide_id"])
        h5 = tiles_dir / "patches" / f"{row['slide_id']}.h5"
        if split not in parts or not h5.exists():
            continue
        coords, geometry = read_coords(h5)
        if signal == "focal":
            if not row.get("lesion_mask"):
                continue  # negative slides have no lesion tiles; normal tiles come from the positive ones
            cover = lesion_fraction(cohort_csv.parent / row["lesion_mask"], coords, geometry.level0_px)
            picks = [(np.flatnonzero(cover >= LESION_TILE), 1), (np.flatnonzero(cover <= NORMAL_TILE), 0)]
        else:
            picks = [(np.arange(len(coords)), int(row["label"]))]
        with open_slide(cohort_csv.parent / row["path"]) as slide:
            for index, label in picks:
                if len(index) == 0:
                    continue
                index = np.sort(rng.permutation(index)[:MAX_TILES_PER_SLIDE])
                parts[split][0].append(slide.read_tiles(coords[index], geometry, channels_first=True))
                parts[split][1].append(np.full(len(index), label, dtype=np.int64))
    out = {}
    for split, (tiles, labels) in parts.items():
        y = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        if len(set(y.tolist())) < 2:
            raise ValueError(f"{cohort_csv}: the {split} slides give no {signal} probe with both classes")
        out[split] = (np.concatenate(tiles), y)
    return out


@torch.no_grad()
def features(encoder: torch.nn.Module, tiles: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Features of uint8 tiles [N, 3, P, P] in eval mode, float64 [N, D]."""
    encoder.eval()
    device = next(encoder.parameters()).device
    out = [encoder(torch.from_numpy(tiles[i:i + chunk]).to(device)).double().cpu().numpy()
           for i in range(0, len(tiles), chunk)]
    return np.concatenate(out)


def linear_probe(encoder: torch.nn.Module, data: dict[str, Any], *, c: float = 1.0) -> dict[str, Any]:
    """Fit the probe on ``data["train"]`` and score it on ``data["test"]``: test ROC AUC and counts."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    f_train, f_test = features(encoder, x_train), features(encoder, x_test)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight="balanced"))
    probe.fit(f_train, y_train)
    auc = float(roc_auc_score(y_test, probe.predict_proba(f_test)[:, 1]))
    return {"probe_auc": auc, "train_tiles": int(len(y_train)), "test_tiles": int(len(y_test)),
            "test_positive_tiles": int(y_test.sum())}
