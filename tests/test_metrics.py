"""Metrics: point estimates against scikit-learn and brute force, the weighted bootstrap, CIs, formatting."""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, mean_absolute_error, r2_score,
                             roc_auc_score)

from fullslide.errors import ConfigError
from fullslide.train.metrics import (bootstrap_weights, c_index, compute_metrics, format_metrics,
                                     higher_is_better, primary_metric, weighted_auc, weighted_c_index)


def brute_c_index(t: np.ndarray, e: np.ndarray, r: np.ndarray) -> float:
    """Harrell's C by explicit double loop over ordered pairs."""
    num = den = 0.0
    for i, j in itertools.product(range(len(t)), repeat=2):
        if e[i] == 1 and t[i] < t[j]:
            den += 1
            num += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    return num / den


def binary_data(n: int, seed: int = 0, signal: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(signal * y + (1 - signal) * rng.random(n), 0, 1)


def test_c_index_hand_computed() -> None:
    # comparable pairs (earlier time has the event): (0,1) (0,2) (0,3) (2,3); slide 1 is censored.
    t, e = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 0, 1, 1])
    assert c_index(t, e, np.array([0.9, 0.5, 0.6, 0.6])) == pytest.approx(3.5 / 4)  # 3 concordant, 1 risk tie
    assert c_index(t, e, np.array([0.5, 0.9, 0.6, 0.6])) == pytest.approx(0.5 / 4)
    # tied times are not comparable: only (0,2) and (1,2) count
    assert c_index(np.array([1.0, 1.0, 2.0]), np.array([1, 1, 0]), np.array([0.0, 5.0, 1.0])) == pytest.approx(0.5)
    assert np.isnan(c_index(t, np.zeros(4), np.arange(4.0)))  # no event: no comparable pair


def test_c_index_matches_brute_force_with_ties() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        n = 40
        t = rng.integers(1, 15, n).astype(float)  # many time ties
        e = rng.integers(0, 2, n)
        r = rng.integers(0, 5, n).astype(float)  # many risk ties
        assert c_index(t, e, r) == pytest.approx(brute_c_index(t, e, r))


def test_perfect_and_inverted_predictions() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert compute_metrics("classification", y, p, n_bootstrap=0)["auc"]["value"] == 1.0
    assert compute_metrics("classification", y, 1 - p, n_bootstrap=0)["auc"]["value"] == 0.0
    t = np.arange(1.0, 9.0)
    y_surv = np.c_[t, np.ones(8)]
    assert compute_metrics("survival", y_surv, -t, n_bootstrap=0)["c_index"]["value"] == 1.0
    assert compute_metrics("survival", y_surv, t, n_bootstrap=0)["c_index"]["value"] == 0.0


def test_binary_point_estimates_match_sklearn() -> None:
    y, p = binary_data(120, seed=2)
    m = compute_metrics("classification", y, p, n_bootstrap=0)
    assert list(m) == ["auc", "accuracy", "balanced_accuracy"]
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, p))
    assert m["accuracy"]["value"] == pytest.approx(accuracy_score(y, p >= 0.5))
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, p >= 0.5))
    two = compute_metrics("classification", y, np.c_[1 - p, p], n_bootstrap=0, classes=["neg", "pos"])
    assert two["auc"]["value"] == pytest.approx(m["auc"]["value"])
    tied = np.round(p, 1)  # score ties count half
    assert compute_metrics("classification", y, tied, n_bootstrap=0)["auc"]["value"] == pytest.approx(
        roc_auc_score(y, tied))


def test_multiclass_point_estimates_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 200)
    probs = rng.random((200, 4)) + 0.6 * np.eye(4)[y]
    probs /= probs.sum(axis=1, keepdims=True)
    m = compute_metrics("classification", y, probs, n_bootstrap=0)
    assert list(m) == ["macro_auc", "balanced_accuracy", "accuracy"]
    assert m["macro_auc"]["value"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)))
    assert m["accuracy"]["value"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    absent = y.copy()
    absent[absent == 3] = 2  # class 3 never true: macro AUC over the classes present
    expected = np.mean([roc_auc_score(absent == c, probs[:, c]) for c in range(3)])
    assert compute_metrics("classification", absent, probs, n_bootstrap=0)["macro_auc"]["value"] == pytest.approx(
        expected)


def test_regression_point_estimates_match_sklearn() -> None:
    rng = np.random.default_rng(4)
    y = rng.normal(size=90)
    p = y + 0.5 * rng.normal(size=90)
    m = compute_metrics("regression", y, p[:, None], n_bootstrap=0)
    assert m["mae"]["value"] == pytest.approx(mean_absolute_error(y, p))
    assert m["r2"]["value"] == pytest.approx(r2_score(y, p))
    assert compute_metrics("regression", np.ones(5), np.arange(5.0), n_bootstrap=10)["r2"]["value"] is None


def test_weighted_statistics_equal_explicit_resampling() -> None:
    rng = np.random.default_rng(5)
    n = 30
    t, e, r = rng.integers(1, 10, n).astype(float), rng.integers(0, 2, n), rng.normal(size=n).round(1)
    y, p = binary_data(n, seed=5)
    w = bootstrap_weights(n, 20, seed=1)
    for b in range(20):
        idx = np.repeat(np.arange(n), w[b])  # the resample the counts stand for
        assert weighted_c_index(t, e, r, w[b:b + 1])[0] == pytest.approx(brute_c_index(t[idx], e[idx], r[idx]))
        if len(set(y[idx])) == 2:
            assert weighted_auc(p, y == 1, w[b:b + 1])[0] == pytest.approx(roc_auc_score(y[idx], p[idx]))


def test_bootstrap_weights_slides_and_patients() -> None:
    w = bootstrap_weights(50, 100, seed=0)
    assert w.shape == (100, 50) and (w.sum(axis=1) == 50).all()
    np.testing.assert_array_equal(w, bootstrap_weights(50, 100, seed=0))
    assert not np.array_equal(w, bootstrap_weights(50, 100, seed=1))
    groups = np.repeat([f"P{i}" for i in range(10)], 3)  # 10 patients x 3 slides
    g = bootstrap_weights(30, 100, seed=0, groups=groups)
    assert (g.sum(axis=1) == 30).all()  # 10 patient draws x 3 slides each
    assert (g.reshape(100, 10, 3) == g.reshape(100, 10, 3)[:, :, :1]).all()  # a patient's slides share a count


def test_ci_contains_point_narrows_with_n_and_is_seeded() -> None:
    widths = []
    for n in (40, 400):
        y, p = binary_data(n, seed=6)
        m = compute_metrics("classification", y, p, n_bootstrap=500, seed=0)
        for name, v in m.items():
            assert v["ci_low"] <= v["value"] <= v["ci_high"], name
            assert v["n"] == n and v["n_boot"] == 500
        widths.append(m["auc"]["ci_high"] - m["auc"]["ci_low"])
    assert widths[1] < 0.6 * widths[0]
    y, p = binary_data(60, seed=7)
    a = compute_metrics("classification", y, p, n_bootstrap=200, seed=3)
    assert a == compute_metrics("classification", y, p, n_bootstrap=200, seed=3)
    assert a != compute_metrics("classification", y, p, n_bootstrap=200, seed=4)


def test_cluster_bootstrap_is_wider_for_duplicated_slides() -> None:
    y, p = binary_data(60, seed=8)
    y2, p2 = np.repeat(y, 2), np.repeat(p, 2)  # each patient scanned twice
    groups = np.repeat(np.arange(60), 2)
    naive = compute_metrics("classification", y2, p2, n_bootstrap=1000)["auc"]
    cluster = compute_metrics("classification", y2, p2, groups=groups, n_bootstrap=1000)["auc"]
    assert cluster["value"] == naive["value"] and cluster["n_groups"] == 60
    assert (cluster["ci_high"] - cluster["ci_low"]) > 1.2 * (naive["ci_high"] - naive["ci_low"])


def test_undefined_resamples_are_skipped_and_counted() -> None:
    y = np.array([1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.1, 0.2, 0.6, 0.3, 0.4])
    m = compute_metrics("classification", y, p, n_bootstrap=1000, seed=0)
    assert 500 < m["auc"]["n_boot"] < 800  # P(no positive drawn) = (5/6)^6 ~ 0.33
    assert m["accuracy"]["n_boot"] == 1000 and m["balanced_accuracy"]["n_boot"] == 1000
    one_class = compute_metrics("classification", np.zeros(5, dtype=int), p[:5], n_bootstrap=50)
    assert one_class["auc"] == {"value": None, "ci_low": None, "ci_high": None, "n": 5, "n_boot": 0}


def test_survival_and_regression_bootstrap() -> None:
    rng = np.random.default_rng(9)
    t = rng.exponential(size=150)
    e = rng.integers(0, 2, 150)
    m = compute_metrics("survival", np.c_[t, e], -t + rng.normal(size=150), groups=np.arange(150) // 3)
    c = m["c_index"]
    assert 0.5 < c["ci_low"] <= c["value"] <= c["ci_high"] < 1.0 and c["n_groups"] == 50
    r = compute_metrics("regression", t, t + 0.1 * rng.normal(size=150))
    assert r["mae"]["ci_low"] <= r["mae"]["value"] <= r["mae"]["ci_high"]


def test_thousand_resamples_are_fast() -> None:
    y, p = binary_data(400, seed=10)
    rng = np.random.default_rng(10)
    start = time.perf_counter()
    compute_metrics("classification", y, p, n_bootstrap=1000)
    compute_metrics("survival", np.c_[rng.exponential(size=400), rng.integers(0, 2, 400)], p, n_bootstrap=1000)
    assert time.perf_counter() - start < 1.0


def test_format_and_primary_metric() -> None:
    metrics = {"auc": {"value": 0.9123, "ci_low": 0.8411, "ci_high": 0.97},
               "accuracy": {"value": 0.85, "ci_low": None, "ci_high": None},
               "balanced_accuracy": {"value": None, "ci_low": None, "ci_high": None}}
    assert format_metrics(metrics) == "auc 0.912 [0.841, 0.970]  accuracy 0.850  balanced_accuracy n/a"
    assert [primary_metric("classification", 2), primary_metric("classification", 5), primary_metric("survival", 0),
            primary_metric("regression", 0)] == ["auc", "macro_auc", "c_index", "r2"]
    assert higher_is_better("auc") and higher_is_better("r2") and not higher_is_better("mae")
    with pytest.raises(ConfigError, match="metric: unknown metric 'f1'"):
        higher_is_better("f1")
    with pytest.raises(ConfigError, match="n_classes: classification needs at least 2"):
        primary_metric("classification", 1)


@pytest.mark.parametrize(("task", "y_true", "y_pred", "message"), [
    ("classification", [0, 1, 2], [0.1, 0.2, 0.3], r"class indices in \[0, 1\]"),
    ("classification", [0, 1], [0.1, 0.2, 0.3], "y_true has 2 rows but y_pred has 3"),
    ("classification", [0, 1], [0.1, float("nan")], "non-finite value.*first at row 1"),
    ("survival", [[1.0, 2.0]], [0.3], r"survival y_true must be \[N, 2\]"),
    ("regression", [1.0, 2.0], [[0.1, 0.2], [0.3, 0.4]], "one prediction per slide"),
    ("classification", [], [], "no predictions"),
])
def test_bad_inputs(task: str, y_true: list[Any], y_pred: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics(task, np.asarray(y_true), np.asarray(y_pred))


def test_unknown_task_and_class_count_mismatch() -> None:
    with pytest.raises(ConfigError, match="task: unknown task 'ranking'"):
        compute_metrics("ranking", [1.0], [1.0])
    with pytest.raises(ValueError, match="3 classes but y_pred has shape"):
        compute_metrics("classification", [0, 1], [[0.5, 0.5], [0.2, 0.8]], classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="groups has 1 entries"):
        compute_metrics("classification", [0, 1], [0.2, 0.8], groups=["p"])
