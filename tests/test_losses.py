"""Losses: Cox partial likelihood by hand and by finite differences, cross-entropy weights, regression, shapes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fullslide.data.cohort import CohortTable, SlideRecord
from fullslide.errors import ConfigError
from fullslide.train.losses import balanced_class_weights, cox_loss, make_loss, n_outputs, predictions


def test_cox_loss_matches_hand_computation() -> None:
    # risks r, times t, events e; events at slides 0 (t=2) and 1 (t=1); slide 2 censored at t=3.
    r = [0.5, -0.2, 1.0]
    loss_fn = make_loss("survival")
    loss = loss_fn(torch.tensor(r).unsqueeze(1), torch.tensor([[2.0, 1.0], [1.0, 1.0], [3.0, 0.0]]))
    term0 = math.log(math.exp(0.5) + math.exp(1.0)) - 0.5  # risk set of t=2: slides 0 and 2
    term1 = math.log(math.exp(0.5) + math.exp(-0.2) + math.exp(1.0)) + 0.2  # risk set of t=1: everyone
    assert loss.item() == pytest.approx((term0 + term1) / 2, rel=1e-6)


def test_cox_loss_breslow_ties_share_the_risk_set() -> None:
    r = torch.tensor([0.3, -0.4, 0.8], dtype=torch.float64)
    loss = cox_loss(r, torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 1.0]))
    log_all = math.log(sum(math.exp(v) for v in (0.3, -0.4, 0.8)))
    expected = ((log_all - 0.3) + (log_all + 0.4) + (0.0)) / 3  # the last event is alone in its risk set
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_cox_gradient_matches_finite_differences() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 1, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.tensor([[3, 1], [1, 0], [4, 1], [4, 1], [2, 1], [5, 0], [1, 1]], dtype=torch.float64)
    loss_fn = make_loss("survival")
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, targets), (logits,), eps=1e-6, atol=1e-7)
    loss_fn(logits, targets).backward()
    eps, base, grad = 1e-6, logits.detach().clone(), logits.grad
    assert grad is not None
    for i in range(7):  # and an explicit central difference, for the reader
        plus, minus = base.clone(), base.clone()
        plus[i, 0] += eps
        minus[i, 0] -= eps
        fd = (loss_fn(plus, targets) - loss_fn(minus, targets)).item() / (2 * eps)
        assert grad[i, 0].item() == pytest.approx(fd, abs=1e-7)


def test_cox_without_events_is_zero_and_connected() -> None:
    logits = torch.randn(4, 1, requires_grad=True)
    loss = make_loss("survival")(logits, torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and (logits.grad == 0).all()


def test_cox_loss_is_low_for_correct_ordering() -> None:
    t = torch.arange(1.0, 9.0)
    targets = torch.stack([t, torch.ones(8)], dim=1)
    loss_fn = make_loss("survival")
    assert loss_fn(-3 * t[:, None], targets) < loss_fn(3 * t[:, None], targets)


def test_cross_entropy_with_and_without_class_weights() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3], [-1.0, 1.0, 0.5], [0.0, 0.0, 3.0]])
    y = torch.tensor([0, 2, 1, 2])
    plain = make_loss("classification", n_classes=3)(logits, y)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, y).item())
    w = [1.0, 2.0, 0.5]
    weighted = make_loss("classification", n_classes=3, class_weights=w)(logits, y)
    per = F.cross_entropy(logits, y, reduction="none")
    expected = sum(w[c] * per[i].item() for i, c in enumerate(y.tolist())) / sum(w[c] for c in y.tolist())
    assert weighted.item() == pytest.approx(expected, rel=1e-6)
    assert weighted.item() != pytest.approx(plain.item())


def test_balanced_class_weights() -> None:
    assert balanced_class_weights([0, 0, 0, 1], 2) == pytest.approx([4 / 6, 4 / 2])
    assert balanced_class_weights(np.array([0, 2, 2, 2]), 3) == pytest.approx([4 / 3, 0.0, 4 / 9])
    with pytest.raises(ConfigError, match=r"class indices in \[0, 1\]"):
        balanced_class_weights([0, 2], 2)


def test_regression_mse_and_l1() -> None:
    logits = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)
    targets = torch.tensor([1.5, 2.0, 2.0])
    assert make_loss("regression")(logits, targets).item() == pytest.approx((0.25 + 0 + 4) / 3)
    assert make_loss("regression", regression_loss="l1")(logits, targets).item() == pytest.approx((0.5 + 0 + 2) / 3)


def test_targets_from_cohort_table_feed_the_losses() -> None:
    recs = tuple(SlideRecord(f"s{i}", Path("x"), f"p{i}", label=str(i % 2), time=float(i + 1), event=i % 2,
                             target=float(i)) for i in range(4))
    logits2 = torch.randn(4, 2, requires_grad=True)
    logits1 = torch.randn(4, 1, requires_grad=True)
    for task, logits in (("classification", logits2), ("survival", logits1), ("regression", logits1)):
        classes = ("0", "1") if task == "classification" else ()
        cohort = CohortTable(Path("mem.csv"), task, recs, classes)
        loss = make_loss(task, n_classes=2)(logits, torch.as_tensor(cohort.targets()))
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()


def test_bad_shapes_and_options() -> None:
    ce = make_loss("classification", n_classes=3)
    with pytest.raises(ValueError, match=r"classification loss: logits must be \[N, 3\], got \[4, 2\]"):
        ce(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"survival loss: targets must be \[4, 2\], got \[4\]"):
        make_loss("survival")(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ConfigError, match="class_weights: need 3 finite non-negative weights"):
        make_loss("classification", n_classes=3, class_weights=[1.0, -1.0, 1.0])
    with pytest.raises(ConfigError, match="class_weights: need 2"):
        make_loss("classification", n_classes=2, class_weights=[1.0])
    with pytest.raises(ConfigError, match="class_weights: only applies to classification"):
        make_loss("survival", class_weights=[1.0])
    with pytest.raises(ConfigError, match="regression_loss: unknown 'huber'"):
        make_loss("regression", regression_loss="huber")
    with pytest.raises(ConfigError, match="task: unknown task 'ranking'"):
        make_loss("ranking")


def test_n_outputs_and_predictions() -> None:
    assert (n_outputs("classification", 4), n_outputs("survival"), n_outputs("regression")) == (4, 1, 1)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        n_outputs("classification", 1)
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    probs = predictions("classification", logits)
    np.testing.assert_allclose(probs, [[0.25, 0.75], [0.5, 0.5]])
    assert probs.dtype == np.float64
    np.testing.assert_array_equal(predictions("survival", logits[:, :1]), [0.0, 2.0])
    np.testing.assert_array_equal(predictions("regression", np.array([[1.5], [-2.0]])), [1.5, -2.0])
    with pytest.raises(ValueError, match="logits must be"):
        predictions("regression", np.zeros(3))
