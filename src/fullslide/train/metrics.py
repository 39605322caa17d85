"""Evaluation metrics with percentile bootstrap 95% confidence intervals (numpy only, no torch).

Every metric is computed as a *weighted* statistic over the N slides, with one weight vector per
bootstrap resample (the number of times each slide was drawn) plus an all-ones vector for the point
estimate. A resample is then one row of a ``[1 + B, N]`` count matrix and all B resamples are
evaluated at once with array operations. With ``groups`` (patient ids) whole patients are drawn
(cluster bootstrap) and every slide of a drawn patient gets the patient's count, since slides of one
patient are not independent. Resamples where a metric is undefined (e.g. one class only) are
skipped for that metric; ``n_boot`` reports how many were used. The CI is the 2.5th and 97.5th
percentile of the resampled values (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13).

Metrics: binary classification: ``auc``, ``accuracy``, ``balanced_accuracy``; multiclass:
``macro_auc`` (one-vs-rest, unweighted mean over classes), ``balanced_accuracy``, ``accuracy``;
survival: ``c_index`` (Harrell et al., JAMA 1982: a pair is comparable when the earlier time is an
event, concordant when that slide has the higher risk, a risk tie counts 0.5; time ties are not
comparable); regression: ``mae``, ``r2``. An undefined point estimate is reported as None.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from fullslide.errors import ConfigError

MetricResult = dict[str, float | int | None]
#: Metrics where lower is better; every other metric here is higher-is-better.
LOWER_IS_BETTER = frozenset({"mae"})
KNOWN_METRICS = frozenset({"auc", "macro_auc", "accuracy", "balanced_accuracy", "c_index", "mae", "r2"})
TASKS = ("classification", "survival", "regression")
_CHUNK = 256  # bootstrap rows per array pass, to bound memory at about _CHUNK x N (x N for the C-index)


def bootstrap_weights(n: int, n_bootstrap: int, seed: int, groups: Sequence[object] | np.ndarray | None = None
                      ) -> np.ndarray:
    """``[n_bootstrap, n]`` int counts: how often each slide is drawn in each resample.

    Without ``groups`` slides are drawn with replacement; with ``groups`` patients are drawn (as many
    draws as patients) and each slide carries its patient's count. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        units, inverse = n, np.arange(n)
    else:
        _, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        units = int(inverse.max()) + 1 if n else 0
    draws = rng.integers(0, units, size=(n_bootstrap, units))  # [B, units]
    offsets = np.arange(n_bootstrap)[:, None] * units
    counts = np.bincount((draws + offsets).ravel(), minlength=n_bootstrap * units).reshape(n_bootstrap, units)
    return counts[:, inverse]  # [B, n]


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC per weight row (Mann-Whitney: P(score_pos > score_neg) + 0.5 P(tie)); NaN if a class is absent.

    scores ``[N]``, positive ``[N]`` bool, weights ``[B, N]`` -> ``[B]``. Sorting once and summing
    weights per distinct score makes each row O(N).
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # first index of each distinct score
    w = weights[:, order].astype(np.float64)
    pos = np.add.reduceat(w * positive[order], starts, axis=1)  # [B, U] positive weight per distinct score
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)  # [B, U]
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each score
    numerator = (pos * (below + 0.5 * neg)).sum(axis=1)
    denominator = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def weighted_c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Harrell's C per weight row; NaN where no pair is comparable.

    The pair (i, j) counts w_i * w_j times, which is what drawing i w_i times and j w_j times
    gives. Builds an ``[E, N]`` pair matrix (E = events): O(N^2) memory and O(B E N) time, fine for
    N up to a few thousand slides.
    """
    events = np.flatnonzero(event > 0)
    comparable = (time[events, None] < time[None, :]).astype(np.float64)  # [E, N] earlier event vs later time
    concordant = comparable * ((risk[events, None] > risk[None, :]) + 0.5 * (risk[events, None] == risk[None, :]))
    w = weights.astype(np.float64)
    numerator = ((w[:, events] @ concordant) * w).sum(axis=1)  # [B]
    denominator = ((w[:, events] @ comparable) * w).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index of ``risk`` (higher = earlier event); NaN when no pair is comparable."""
    time, event, risk = (np.asarray(a, dtype=np.float64).ravel() for a in (time, event, risk))
    return float(weighted_c_index(time, event, risk, np.ones((1, time.size)))[0])


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Row-wise weighted mean of a per-slide value ``[N]`` under weights ``[B, N]`` -> ``[B]``."""
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (weights * values).sum(axis=1) / total, np.nan)


def _balanced_accuracy(y: np.ndarray, correct: np.ndarray, n_classes: int, weights: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present in each resample (as scikit-learn's balanced_accuracy_score)."""
    recalls = np.stack([_weighted_mean(correct[y == c], weights[:, y == c]) for c in range(n_classes)], axis=1)
    present = ~np.isnan(recalls)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present.any(axis=1), np.nansum(recalls, axis=1) / present.sum(axis=1), np.nan)


def _classification(y: np.ndarray, p: np.ndarray, n_classes: int, w: np.ndarray) -> dict[str, np.ndarray]:
    """Metric name -> ``[B]`` values for class indices ``y [N]`` and scores ``p [N]`` (binary) or ``[N, C]``."""
    if p.ndim == 1:
        predicted, scores = (p >= 0.5).astype(np.int64), p
    else:
        predicted, scores = np.argmax(p, axis=1), p[:, 1]
    correct = (predicted == y).astype(np.float64)
    accuracy = _weighted_mean(correct, w)
    balanced = _balanced_accuracy(y, correct, n_classes, w)
    if n_classes == 2:
        return {"auc": weighted_auc(scores, y == 1, w), "accuracy": accuracy, "balanced_accuracy": balanced}
    present = [c for c in range(n_classes) if (y == c).any()]
    if len(present) < 2:
        macro = np.full(w.shape[0], np.nan)
    else:  # a resample missing one of these classes gives NaN and is skipped
        macro = np.mean([weighted_auc(p[:, c], y == c, w) for c in present], axis=0)
    return {"macro_auc": macro, "balanced_accuracy": balanced, "accuracy": accuracy}


def _regression(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """MAE and R^2 = 1 - SS_res / SS_tot (NaN when the targets are constant)."""
    mean = _weighted_mean(y, w)
    ss_res = (w * (y - p) ** 2).sum(axis=1)
    ss_tot = (w * (y[None, :] - mean[:, None]) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.nan)
    return {"mae": _weighted_mean(np.abs(y - p), w), "r2": r2}


def _checked_inputs(task: str, y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str] | None
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate shapes and values; return (y_true, y_pred, n_classes) in canonical shapes."""
    if task not in TASKS:
        raise ConfigError(f"task: unknown task '{task}'; choose one of {', '.join(TASKS)}")
    y_pred = np.asarray(y_pred, dtype=np.float64)
    n = len(y_pred)
    if n == 0:
        raise ValueError("metrics: no predictions (N = 0)")
    if y_pred.ndim == 2 and y_pred.shape[1] == 1:
        y_pred = y_pred[:, 0]
    if not np.isfinite(y_pred).all():
        raise ValueError(f"metrics: y_pred has {int((~np.isfinite(y_pred)).sum())} non-finite value(s), "
                         f"first at row {int(np.argwhere(~np.isfinite(y_pred))[0][0])}")
    y_true = np.asarray(y_true)
    if len(y_true) != n:
        raise ValueError(f"metrics: y_true has {len(y_true)} rows but y_pred has {n}")
    if task == "classification":
        n_classes = 2 if y_pred.ndim == 1 else y_pred.shape[1]
        if classes is not None and len(classes) != n_classes:
            raise ValueError(f"metrics: {len(classes)} classes but y_pred has shape {y_pred.shape}")
        if y_true.ndim != 1 or not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 \
                or y_true.max() >= n_classes:
            raise ValueError(f"metrics: y_true must be class indices in [0, {n_classes - 1}], "
                             f"got dtype {y_true.dtype} shape {y_true.shape}")
        return y_true.astype(np.int64), y_pred, n_classes
    if y_pred.ndim != 1:
        raise ValueError(f"metrics: {task} needs one prediction per slide, got shape {y_pred.shape}")
    y_true = y_true.astype(np.float64)
    if task == "survival":
        if y_true.ndim != 2 or y_true.shape[1] != 2 or not np.isin(y_true[:, 1], (0.0, 1.0)).all():
            raise ValueError(f"metrics: survival y_true must be [N, 2] (time, event 0/1), got shape {y_true.shape}")
    elif y_true.ndim != 1:
        raise ValueError(f"metrics: regression y_true must be [N], got shape {y_true.shape}")
    if not np.isfinite(y_true).all():
        raise ValueError("metrics: y_true has non-finite values")
    return y_true, y_pred, 0


def compute_metrics(
    task: str,
    y_true: np.ndarray | Sequence[float],
    y_pred: np.ndarray | Sequence[float],
    *,
    groups: Sequence[object] | np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> dict[str, MetricResult]:
    """Metric name -> ``{"value", "ci_low", "ci_high", "n", "n_boot"}`` (plus ``"n_groups"`` with groups).

    classification: ``y_true`` int class indices ``[N]``, ``y_pred`` probabilities ``[N]`` (of class 1;
    predicted class: p >= 0.5) or ``[N, C]`` (predicted class: argmax); ``classes`` only checks C.
    survival: ``y_true [N, 2]`` (time, event), ``y_pred`` risk ``[N]``. regression: ``[N]`` and ``[N]``.
    ``groups`` (e.g. patient ids, ``[N]``) switches to the cluster bootstrap. Deterministic in ``seed``.
    """
    y, p, n_classes = _checked_inputs(task, np.asarray(y_true), np.asarray(y_pred), classes)
    n = len(p)
    if groups is not None and len(groups) != n:
        raise ValueError(f"metrics: groups has {len(groups)} entries but there are {n} predictions")
    if n_bootstrap < 0:
        raise ConfigError(f"n_bootstrap: must be >= 0, got {n_bootstrap}")
    boot = bootstrap_weights(n, n_bootstrap, seed, groups)
    weights = np.vstack([np.ones((1, n), dtype=boot.dtype), boot])  # [1 + B, N]; row 0 = the point estimate
    rows: dict[str, list[np.ndarray]] = {}
    for start in range(0, n_bootstrap + 1, _CHUNK):
        w = weights[start: start + _CHUNK].astype(np.float64)
        if task == "classification":
            values = _classification(y, p, n_classes, w)
        elif task == "survival":
            values = {"c_index": weighted_c_index(y[:, 0], y[:, 1], p, w)}
        else:
            values = _regression(y, p, w)
        for name, v in values.items():
            rows.setdefault(name, []).append(v)
    out: dict[str, MetricResult] = {}
    for name, parts in rows.items():
        allv = np.concatenate(parts)
        point, resampled = allv[0], allv[1:]
        valid = resampled[~np.isnan(resampled)]
        low, high = np.percentile(valid, [2.5, 97.5]) if valid.size else (np.nan, np.nan)
        out[name] = {"value": _num(point), "ci_low": _num(low), "ci_high": _num(high), "n": n,
                     "n_boot": int(valid.size)}
        if groups is not None:
            out[name]["n_groups"] = len(set(map(str, groups)))
    return out


def _num(x: float) -> float | None:
    """A JSON-safe float: None for NaN."""
    return None if math.isnan(float(x)) else float(x)


def format_metrics(metrics: Mapping[str, Mapping[str, float | int | None]]) -> str:
    """One line: ``auc 0.912 [0.841, 0.970]  accuracy 0.850 [0.780, 0.910]`` (``n/a`` when undefined)."""
    parts = []
    for name, m in metrics.items():
        value, low, high = m.get("value"), m.get("ci_low"), m.get("ci_high")
        text = f"{name} " + ("n/a" if value is None else f"{value:.3f}")
        if value is not None and low is not None and high is not None:
            text += f" [{low:.3f}, {high:.3f}]"
        parts.append(text)
    return "  ".join(parts)


def primary_metric(task: str, n_classes: int = 2) -> str:
    """The metric that selects checkpoints: ``auc`` (binary), ``macro_auc`` (multiclass), ``c_index``, ``r2``.

    R^2 rather than MAE for regression because it is scale-free, so one early-stopping rule reads the
    same for any target unit; see :func:`higher_is_better` for the direction.
    """
    if task == "classification":
        if n_classes < 2:
            raise ConfigError(f"n_classes: classification needs at least 2 classes, got {n_classes}")
        return "auc" if n_classes == 2 else "macro_auc"
    if task == "survival":
        return "c_index"
    if task == "regression":
        return "r2"
    raise ConfigError(f"task: unknown task '{task}'; choose one of {', '.join(TASKS)}")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (False only for errors such as ``mae``)."""
    if metric not in KNOWN_METRICS:
        raise ConfigError(f"metric: unknown metric '{metric}'; known: {', '.join(sorted(KNOWN_METRICS))}")
    return metric not in LOWER_IS_BETTER
